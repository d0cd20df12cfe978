"""Kernel supply: which kernel to boot, building reference kernels, the guest initramfs, the cache."""
