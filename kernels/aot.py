"""Ahead-of-time compilation of a Triton kernel for a GPU that need not be present (ptxas runs
on the CPU): how the kernels are checked for Hopper on a machine without one."""
import torch
import triton

TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _jit_function(fn):
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("compiling ahead needs TRITON_INTERPRET unset before Python starts")
    return fn


def compile_specialised(fn, args: tuple, kwargs: dict, capability: int = 90):
    """fn compiled for sm_`capability` as `fn[grid](*args, **kwargs)` would compile it at run
    time: Triton's own binder specialises the arguments (ints divisible by 16 get
    tt.divisibility=16, ints equal to 1 become constants, pointers are typed by their dtype and
    marked 16-byte aligned by their data_ptr()), so a stand-in with .dtype and .data_ptr()
    serves for a tensor. kwargs hold the constexprs and the launch options (num_warps,
    num_stages). Returns Triton's CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(fn)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, (kind, attr)) in enumerate(zip(fn.params, specialization)):
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = bound[param.name]
        elif isinstance(attr, str):
            attrs[(i,)] = backend.parse_attr(attr)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options)


def compile_for(fn, constexprs: dict, pointers: dict, num_warps: int, num_stages: int,
                capability: int = 90, floats: tuple = ()):
    """Unspecialised: Triton's CompiledKernel (PTX and cubin in .asm) with every integer a
    plain i32 and no alignment known. `pointers` maps pointer arguments to torch dtypes,
    `floats` names the fp32 scalars. Prefer compile_specialised, which builds the kernel that
    actually runs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(fn)
    signature = {name: "constexpr" if name in constexprs else
                 f"*{TRITON_DTYPES[pointers[name]]}" if name in pointers else
                 "fp32" if name in floats else "i32"
                 for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))
