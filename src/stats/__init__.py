"""The statistics as pure functions of tensors, the compiled kernel that computes them in one pass, the
names they are known by, and the files they are kept in (the dense trace and the histograms)."""
