import torch, timeit, normkit.nn as nkn
torch.set_num_threads(2)
x = torch.randn(2, 16, 8, 8, requires_grad=True); dy = torch.randn(2, 16, 8, 8)
pairs = [
    ("BatchNorm2d (train)", nkn.BatchNorm2d(16), torch.nn.BatchNorm2d(16)),
    ("GroupNorm(4)", nkn.GroupNorm(4, 16), torch.nn.GroupNorm(4, 16)),
    ("InstanceNorm2d(affine)", nkn.InstanceNorm2d(16, affine=True), torch.nn.InstanceNorm2d(16, affine=True)),
    ("LayerNorm2d (vs permute+LayerNorm)", nkn.LayerNorm2d(16), None),
    ("GroupNormProxyAct2d(4) (vs GroupNorm+ReLU)", nkn.GroupNormProxyAct2d(16, num_groups=4), torch.nn.Sequential(torch.nn.GroupNorm(4, 16), torch.nn.ReLU())),
]
class LN2d(torch.nn.LayerNorm):
    def forward(self, t): return super().forward(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
def T(fn, n=5000):
    return min(timeit.repeat(fn, number=n, repeat=7)) / n * 1e6
print("| layer | forward us (normkit / torch) | ratio | forward + backward us | ratio |")
print("|---|---:|---:|---:|---:|")
for name, a, b in pairs:
    b = b if b is not None else LN2d(16)
    pa, pb = [x, *a.parameters()], [x, *b.parameters()]
    fa, fb = T(lambda: a(x)), T(lambda: b(x))
    ga = T(lambda: torch.autograd.grad(a(x), pa, dy), 2000); gb = T(lambda: torch.autograd.grad(b(x), pb, dy), 2000)
    print(f"| {name} | {fa:.1f} / {fb:.1f} | {fa/fb:.2f} | {ga:.1f} / {gb:.1f} | {ga/gb:.2f} |")
