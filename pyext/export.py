"""cnnfuse.export: a fused model as a torch.export program (.pt2), for torch.export.load,
torch.compile and AOTInductor, with its batch dimension dynamic where the model allows."""
import json
import os
from typing import Union

import torch
import torch.export
from torch import nn

from .backend import log
from .tune import _as_inputs, current_picks, environment, with_batch

PathLike = Union[str, os.PathLike]


def export(fused: nn.Module, example_inputs, path: PathLike, *,
           dynamic_batch: bool = True) -> "torch.export.ExportedProgram":
    """Write `fused` as a torch.export program to `path` (a .pt2) and return the program.

    example_inputs: a tensor or tuple of tensors as `fused` takes them. With dynamic_batch,
    dim 0 of every input is one symbolic batch size (an example batch of 1 is traced at 2 so
    it stays symbolic); a model that fixes its batch is exported at the example's, with a log
    line. The program calls the cnnfuse ops by name (torch.ops.cnnfuse.*): a process that runs
    it needs cnnfuse imported, e.g. `torch.export.load(path).module()`, torch.compile on it,
    or torch._inductor.aoti_compile_and_package. Only load .pt2 files you trust:
    torch.export.load may unpickle (cnnfuse.save / cnnfuse.load never do).

    Raises TypeError for a non-module or non-tensor inputs.
    """
    if not isinstance(fused, nn.Module):
        raise TypeError(f"fused must be a torch.nn.Module, got {type(fused).__name__}")
    inputs = _as_inputs(example_inputs)
    program = None
    if dynamic_batch:
        batch = max(2, inputs[0].shape[0])
        traced = tuple(with_batch(t, batch) for t in inputs)
        dim = torch.export.Dim("batch", min=1, max=1 << 20)
        try:
            program = torch.export.export(fused, traced, dynamic_shapes=tuple({0: dim}
                                                                             for _ in traced))
        except Exception as exc:  # export raises several types for a specialised dim
            log.warning("cnnfuse.export: the batch size stays %d (the model fixes it: %s)",
                        inputs[0].shape[0], str(exc).splitlines()[0][:200] if str(exc) else
                        type(exc).__name__)
    if program is None:
        program = torch.export.export(fused, inputs)
    picks = {"format": "cnnfuse-picks", "version": 1, "environment": environment(),
             "picks": current_picks()}
    torch.export.save(program, path, extra_files={"cnnfuse_picks.json": json.dumps(picks)})
    return program
