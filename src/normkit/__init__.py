from normkit import functional
