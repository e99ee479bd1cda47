"""The fusion passes, one rewrite per file, in the order they run.

Each pass is `run(g: FusionGraph)` and rewrites the graph in place. The order matters where
one rewrite exposes or consumes another's pattern: dropping inference no-ops exposes residual
adds; channel permutations go before conv_bn_act, which then folds the BatchNorms and
activations moved before them; SE gates go before BatchNorm prologues (the gate scales the conv's raw input); the
fused pairs (depthwise + 1x1, pool + 1x1) before the concatenations, so they write their
slices; sibling merges last, so concat writers keep writing directly."""
from . import (concat, conv_bn_act, dense_block, input_bn, leftover_bn, passthrough,
               pool_conv2d, residual, separable, siblings, squeeze_excite)
from . import (act_prologue, bn_act, branch_sum, cat_bn, channel_permutation, functional_conv,
               gated_product, leftover_act, leftover_elementwise, same_padding, scalar_scale,
               unreached)
from . import channel_gate  # after squeeze_excite: real SE blocks keep the se_gate kernel
from . import layout  # last: puts outputs back into eager's layout

PIPELINE = (
    unreached,
    passthrough,
    functional_conv,
    channel_permutation,
    conv_bn_act,
    cat_bn,
    branch_sum,
    scalar_scale,
    gated_product,
    residual,
    squeeze_excite,
    channel_gate,
    input_bn,
    separable,
    pool_conv2d,
    dense_block,
    concat,
    siblings,
    act_prologue,
    bn_act,
    same_padding,
    leftover_elementwise,
    leftover_bn,
    leftover_act,
    layout,
)


def run_all(g) -> None:
    for rewrite in PIPELINE:
        rewrite.run(g)
