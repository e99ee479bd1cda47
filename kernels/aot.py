"""Ahead-of-time compilation of a Triton kernel for a GPU that need not be present (ptxas runs
on the CPU): how the kernels are checked for Hopper on a machine without one."""
import torch
import triton

TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_for(fn, constexprs: dict, pointers: dict, num_warps: int, num_stages: int,
                capability: int = 90, floats: tuple = ()):
    """Triton's CompiledKernel (PTX and cubin in .asm). `pointers` maps pointer arguments to
    torch dtypes, `floats` names the fp32 scalars; every other non-constexpr argument is an
    i32."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("compiling ahead needs TRITON_INTERPRET unset before Python starts")
    signature = {name: "constexpr" if name in constexprs else
                 f"*{TRITON_DTYPES[pointers[name]]}" if name in pointers else
                 "fp32" if name in floats else "i32"
                 for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))
