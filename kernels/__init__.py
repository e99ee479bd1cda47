"""Triton kernels of cnnfuse: `@triton.jit` bodies, their launchers and tile configurations.

Nothing here knows about torch.library or nn.Module; `cnnfuse.ops` decides when to call in.
"""
