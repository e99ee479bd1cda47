"""Small random networks made of everything `cnnfuse.fuse` rewrites, for the differential
fuzzer (test_fuzz.py): a program is a list of steps, each reading earlier values (the input is
value 0) and adding new ones; `build(program)` makes the nn.Module that runs it.

A step is a tuple (kind, inputs, params); everything in it is plain data, so a failing
program prints as a literal that can be pasted back as a named regression."""
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn


class Spec:
    """How one activation is spelled: its module and function, the names of its parameters
    (for the keyword form), the parameter values to draw (None: PyTorch's defaults, no
    arguments), its Tensor method, and which in-place spellings exist: a module taking
    inplace=True, a function taking inplace=True, and `underscore`, the trailing-underscore
    function (F.elu_, torch.selu_, or the method x.relu_() where that is all there is)."""

    def __init__(self, module, function, keywords=(), values=(None,), method=None,
                 module_inplace=False, function_inplace=False, underscore=None,
                 positional=True):
        self.module, self.function, self.keywords, self.values = module, function, keywords, values
        self.method, self.module_inplace, self.function_inplace = (method, module_inplace,
                                                                   function_inplace)
        self.underscore, self.positional = underscore, positional

    def forms(self) -> tuple:
        """The forms this activation has (FORMS' spellings that exist for it)."""
        return tuple(f for f, ok in (
            ("module", True), ("function", True), ("keyword", bool(self.keywords)),
            ("method", self.method is not None),
            ("inplace", self.module_inplace or self.function_inplace),
            ("function_inplace", self.function_inplace),
            ("underscore", self.underscore is not None)) if ok)


def _method(name):
    return lambda x, *args: getattr(x, name)(*args)


# Everything models/patterns.py fuses, in every spelling it matches, with its parameters, and
# what no kernel computes: softsign, and PReLU with a weight per channel ("prelu_channels";
# "prelu" is the one-weight PReLU, which fuses as leaky_relu). PReLU's parameter values are its
# weight: one slope, or the (first, last) of slopes spread over the channels.
ACTIVATIONS = {
    "relu": Spec(nn.ReLU, F.relu, method="relu", module_inplace=True, function_inplace=True,
                 underscore=F.relu_),
    "relu6": Spec(nn.ReLU6, F.relu6, module_inplace=True, function_inplace=True),
    "silu": Spec(nn.SiLU, F.silu, module_inplace=True, function_inplace=True),
    "hardswish": Spec(nn.Hardswish, F.hardswish, module_inplace=True, function_inplace=True),
    "hardsigmoid": Spec(nn.Hardsigmoid, F.hardsigmoid, module_inplace=True,
                        function_inplace=True),
    "sigmoid": Spec(nn.Sigmoid, torch.sigmoid, method="sigmoid",
                    underscore=_method("sigmoid_")),
    "gelu": Spec(nn.GELU, F.gelu, ("approximate",), (None, ("tanh",)), positional=False),
    "tanh": Spec(nn.Tanh, torch.tanh, method="tanh", underscore=torch.tanh_),
    "leaky_relu": Spec(nn.LeakyReLU, F.leaky_relu, ("negative_slope",),
                       (None, (0.2,), (-0.375,), (1.5,)), module_inplace=True,
                       function_inplace=True, underscore=F.leaky_relu_),
    "prelu": Spec(nn.PReLU, F.prelu, (), ((0.25,), (-0.125,), (0.75,)), method="prelu"),
    "prelu_channels": Spec(nn.PReLU, F.prelu, (), ((-0.25, 0.5), (0.125, 0.875)),
                           method="prelu"),
    "elu": Spec(nn.ELU, F.elu, ("alpha",), (None, (0.5,), (2.0,)), module_inplace=True,
                function_inplace=True, underscore=F.elu_),
    "celu": Spec(nn.CELU, F.celu, ("alpha",), (None, (0.5,), (2.0,)), module_inplace=True,
                 function_inplace=True, underscore=torch.celu_),
    "selu": Spec(nn.SELU, F.selu, module_inplace=True, function_inplace=True,
                 underscore=torch.selu_),
    "mish": Spec(nn.Mish, F.mish, module_inplace=True, function_inplace=True),
    "hardtanh": Spec(nn.Hardtanh, F.hardtanh, ("min_val", "max_val"),
                     (None, (0.0, 6.0), (-0.5, 2.0), (-2.0, 0.25)), module_inplace=True,
                     function_inplace=True, underscore=F.hardtanh_),
    "softplus": Spec(nn.Softplus, F.softplus, ("beta", "threshold"),
                     (None, (2.0, 5.0), (0.5, 20.0))),
    "softsign": Spec(nn.Softsign, F.softsign),
}
FORMS = ("module", "function", "keyword", "method", "inplace", "function_inplace",
         "underscore")


class Act(nn.Module):
    """An activation in one of its spellings (FORMS), with parameters `params` (None:
    PyTorch's defaults) over `channels` channels (a per-channel PReLU's weights). A form the
    activation lacks falls back to one it has: method -> function, an in-place form -> the
    other in-place forms, then the function."""

    def __init__(self, name: str, form: str, params=None, channels: int = 1):
        super().__init__()
        spec = self.spec = ACTIVATIONS[name]
        self.name, self.params = name, tuple(params) if params is not None else None
        forms = spec.forms()
        if form not in forms:
            fallback = {"method": ("function",),
                        "inplace": ("function_inplace", "underscore", "function"),
                        "function_inplace": ("inplace", "underscore", "function"),
                        "underscore": ("inplace", "function"), "keyword": ("function",)}
            form = next(f for f in fallback.get(form, ()) + ("function",) if f in forms)
        self.form = form
        if name.startswith("prelu"):
            # The weight is the parameter the function and method forms pass.
            a = self.params or spec.values[0]
            n = channels if name == "prelu_channels" else 1
            weight = torch.linspace(a[0], a[-1], n) if len(a) == 2 else torch.full((n,), a[0])
            if form == "module":
                self.m = nn.PReLU(n)
                with torch.no_grad():
                    self.m.weight.copy_(weight)
            else:
                self.weight = nn.Parameter(weight)
        elif form == "module":
            self.m = spec.module(*(self.params or ()))
        elif form == "inplace" and spec.module_inplace:
            self.m = spec.module(*(self.params or ()), inplace=True)

    def _args(self) -> tuple:
        if self.name.startswith("prelu"):
            return (self.weight,)
        return self.params or ()

    def forward(self, x):
        spec = self.spec
        if hasattr(self, "m"):
            return self.m(x)
        if self.form == "method":
            return getattr(x, spec.method)(*self._args())
        if self.form == "underscore":
            return spec.underscore(x, *self._args())
        if self.form in ("inplace", "function_inplace"):
            return spec.function(x, *self._args(), inplace=True)
        if self.form == "keyword" or (self.params and not spec.positional):
            return spec.function(x, **dict(zip(spec.keywords, self._args())))
        return spec.function(x, *self._args())


def _bn(channels: int, stats: str, seed: int) -> nn.BatchNorm2d:
    """A BatchNorm with random eval statistics: ordinary, tiny variances (dead channels:
    folding multiplies by up to 300) or huge ones."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g) * 0.5)
        lo, hi = {"ordinary": (0.3, 3.0), "tiny": (1e-7, 1e-4), "huge": (1e2, 1e4)}[stats]
        var = torch.empty(channels).uniform_(0, 1, generator=g) * (hi - lo) + lo
        bn.running_var.copy_(var)
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g) * 0.5)
    return bn


class Conv(nn.Module):
    """conv [-> BatchNorm] [-> activation]; the conv weight maybe under spectral_norm or
    weight_norm (hook-based) or a parametrization."""

    def __init__(self, cin, cout, k, stride, pad, dil, groups, bias, bn, act, reparam, seed):
        super().__init__()
        torch.manual_seed(seed)
        conv = nn.Conv2d(cin, cout, k, stride, pad, dil, groups, bias=bias)
        if reparam == "spectral_norm":
            conv = nn.utils.spectral_norm(conv)
        elif reparam == "weight_norm":
            conv = nn.utils.weight_norm(conv)
        elif reparam == "parametrization":
            conv = nn.utils.parametrizations.weight_norm(conv)
        self.conv = conv
        self.bn = _bn(cout, bn, seed + 1) if bn else None
        self.act = Act(*act, channels=cout) if act else None

    def forward(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        if self.act is not None:
            y = self.act(y)
        return y


class Residual(nn.Module):
    """conv3x3 + BN, added to its input in one of the add's spellings, then an activation."""

    def __init__(self, c, form, act, seed):
        super().__init__()
        self.body = Conv(c, c, 3, 1, 1, 1, 1, False, "ordinary", None, None, seed)
        self.form, self.act = form, Act(*act, channels=c) if act else None

    def forward(self, x):
        y = self.body(x)
        if self.form == "plus":
            y = y + x
        elif self.form == "iadd":
            y += x
        elif self.form == "torch.add":
            y = torch.add(x, y)
        elif self.form == "add_":
            y = y.add_(x)
        else:  # into the other operand: the input itself changes
            x += y
            y = x
        return self.act(y) if self.act is not None else y


class Cat(nn.Module):
    def __init__(self, shuffle: int):
        super().__init__()
        self.shuffle = shuffle

    def forward(self, *xs):
        y = torch.cat(xs, 1)
        if self.shuffle:
            n, c, h, w = y.size()
            y = y.view(n, self.shuffle, c // self.shuffle, h, w).transpose(1, 2)
            y = y.contiguous().view(n, -1, h, w)
        return y


class Split(nn.Module):
    def __init__(self, form: str, first: int):
        super().__init__()
        self.form, self.first = form, first

    def forward(self, x):
        if self.form == "chunk":
            return tuple(x.chunk(2, dim=1))
        if self.form == "split":
            return tuple(torch.split(x, [self.first, x.shape[1] - self.first], dim=1))
        return x.narrow(1, 0, self.first), x[:, self.first:]


class Pool(nn.Module):
    def __init__(self, kind, form, k, stride, pad, ceil):
        super().__init__()
        self.kind, self.form, self.args = kind, form, (k, stride, pad)
        self.ceil = ceil
        if form == "module":
            self.m = (nn.MaxPool2d(k, stride, pad, ceil_mode=ceil) if kind == "max" else
                      nn.AvgPool2d(k, stride, pad, ceil_mode=ceil,
                                   count_include_pad=kind == "avg"))

    def forward(self, x):
        if self.form == "module":
            return self.m(x)
        k, s, p = self.args
        if self.kind == "max":
            return F.max_pool2d(x, k, s, p, ceil_mode=self.ceil)
        return F.avg_pool2d(x, k, s, p, ceil_mode=self.ceil, count_include_pad=self.kind == "avg")


class SqueezeExcite(nn.Module):
    def __init__(self, c, r, pool, act, gate, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)
        self.pool, self.act, self.gate = pool, Act(act, "module"), Act(gate, "function")
        if pool == "module":
            self.avg = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        if self.pool == "module":
            s = self.avg(x)
        elif self.pool == "function":
            s = F.adaptive_avg_pool2d(x, 1)
        else:
            s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class Add(nn.Module):
    """a + b then an activation: an SE block's residual tail when a is its product."""

    def __init__(self, act, c=1):
        super().__init__()
        self.act = Act(*act, channels=c) if act else None

    def forward(self, a, b):
        y = a + b
        return self.act(y) if self.act is not None else y


class InPlace(nn.Module):
    """A write into a value or a view of it; returns nothing new."""

    def __init__(self, kind: str, k: int):
        super().__init__()
        self.kind, self.k = kind, k

    def forward(self, x):
        if self.kind == "relu_":
            x.relu_()
        elif self.kind == "slice_mul_":
            x[:, :self.k].mul_(0.5)
        elif self.kind == "narrow_add_":
            x.narrow(1, 0, self.k).add_(1.0)
        elif self.kind == "iadd":
            x += 1.0
        elif self.kind == "setitem":
            x[:, :self.k] = 0.0
        elif self.kind == "select_zero_":
            x.select(1, 0).zero_()
        return ()


class View(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, x):
        n, c, h, w = x.shape
        if self.form == "view":
            return x.view(n, c, h * w).view(n, c, h, w)
        if self.form == "reshape":
            return x.reshape(n, c * h, w).reshape(n, c, h, w)
        return x.flatten(2).unflatten(2, (h, w))


class Dense(nn.Module):
    """A dense block: each layer BN -> ReLU -> 1x1 conv reads the concatenation of all before
    it, and the block returns the concatenation of all."""

    def __init__(self, c, growth, layers, seed):
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(layers):
            bn = _bn(c + i * growth, "ordinary", seed + 10 * i)
            torch.manual_seed(seed + 10 * i + 1)
            self.layers.append(nn.Sequential(bn, nn.ReLU(inplace=True),
                                              nn.Conv2d(c + i * growth, growth, 1, bias=False)))

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)


class Net(nn.Module):
    """Runs a program; returns the last value, or it and the values `outputs` names."""

    def __init__(self, program):
        super().__init__()
        self.steps, self.outputs = program["steps"], tuple(program["outputs"])
        self.blocks = nn.ModuleList(_make(kind, params) for kind, _, params in self.steps)

    def run(self, x):
        values = [x]
        for (kind, inputs, _), block in zip(self.steps, self.blocks):
            out = block(*[values[i] for i in inputs])
            values += list(out) if isinstance(out, tuple) else [out]
        return values[-1] if not self.outputs else (values[-1],) + tuple(
            values[i] for i in self.outputs)

    def forward(self, x):
        return self.run(x)


class NetWithDefault(Net):
    """The same, with a defaulted forward argument (added when given)."""

    def forward(self, x, skip=None):
        y = self.run(x)
        if skip is not None:
            y = (y[0] + skip,) + y[1:] if isinstance(y, tuple) else y + skip
        return y


def _make(kind, p) -> nn.Module:
    if kind == "conv":
        return Conv(**p)
    if kind == "sep":  # depthwise (+ BN + act) then 1x1
        return nn.Sequential(Conv(**p["dw"]), Conv(**p["pw"]))
    if kind == "residual":
        return Residual(**p)
    if kind == "cat":
        return Cat(**p)
    if kind == "split":
        return Split(**p)
    if kind == "pool":
        return Pool(**p)
    if kind == "se":
        return SqueezeExcite(**p)
    if kind == "add":
        return Add(**p)
    if kind == "inplace":
        return InPlace(**p)
    if kind == "view":
        return View(**p)
    if kind == "act":
        return Act(*p["act"], channels=p.get("c", 1))
    if kind == "dense":
        return Dense(**p)
    raise ValueError(kind)


def build(program, seed_offset: int = 0) -> nn.Module:
    cls = NetWithDefault if program.get("default_arg") else Net
    return cls(program).eval()


# --- the strategy ------------------------------------------------------------------------

def _out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def activations(draw, allow_none=True):
    """None (maybe), or (name, form, parameters) of one of ACTIVATIONS in a form it has."""
    if allow_none and draw(st.booleans()):
        return None
    name = draw(st.sampled_from(sorted(ACTIVATIONS)))
    spec = ACTIVATIONS[name]
    return name, draw(st.sampled_from(spec.forms())), draw(st.sampled_from(spec.values))


@st.composite
def conv_params(draw, cin, h, w, seed, cout=None, k=None, groups=None, reparam=True):
    k = k if k is not None else draw(st.sampled_from([1, 1, 3, 3, 5, 2]))
    stride = draw(st.sampled_from([1, 1, 2]))
    dil = draw(st.sampled_from([1, 1, 2])) if k > 1 else 1
    pad = draw(st.integers(0, (k // 2) * dil))
    while _out(h, k, stride, pad, dil) < 1 or _out(w, k, stride, pad, dil) < 1:
        k, dil, pad = 1, 1, 0
    if groups is None:
        groups = draw(st.sampled_from([g for g in (1, 1, 2, 3, cin) if cin % g == 0]))
    if cout is None:
        cout = groups * draw(st.integers(1, max(1, 8 // groups)))
    return dict(cin=cin, cout=cout, k=k, stride=stride, pad=pad, dil=dil, groups=groups,
                bias=draw(st.booleans()),
                bn=draw(st.sampled_from([None, "ordinary", "ordinary", "tiny", "huge"])),
                act=draw(activations()),
                reparam=draw(st.sampled_from([None] * 6 + ["spectral_norm", "weight_norm",
                                                           "parametrization"]))
                if reparam else None, seed=seed), (cout, _out(h, k, stride, pad, dil),
                                                     _out(w, k, stride, pad, dil))


STEP_KINDS = ("conv", "conv", "sep", "residual", "cat", "split", "pool", "se", "inplace",
              "view", "act", "siblings", "dense")


@st.composite
def programs(draw, max_steps: int = 5, max_size: int = 9):
    """A program: {'input': (n, c, h, w), 'steps': [...], 'outputs': [...], 'default_arg'}."""
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 6))
    h, w = draw(st.integers(1, max_size)), draw(st.integers(1, max_size))
    shapes = [(c, h, w)]  # value index -> (c, h, w)
    steps = []
    seed = draw(st.integers(0, 2 ** 16))
    for i in range(draw(st.integers(1, max_steps))):
        kind = draw(st.sampled_from(STEP_KINDS))
        src = draw(st.integers(0, len(shapes) - 1))
        sc, sh, sw = shapes[src]
        s = seed + 100 * i
        if kind == "conv":
            p, shape = draw(conv_params(sc, sh, sw, s))
            steps.append(("conv", [src], p))
            shapes.append(shape)
        elif kind == "sep":
            dw, (dc, dh, dwid) = draw(conv_params(sc, sh, sw, s, cout=sc, k=3, groups=sc))
            pw, shape = draw(conv_params(dc, dh, dwid, s + 50, k=1, groups=1))
            steps.append(("sep", [src], dict(dw=dw, pw=pw)))
            shapes.append(shape)
        elif kind == "residual":
            steps.append(("residual", [src], dict(
                c=sc, form=draw(st.sampled_from(["plus", "iadd", "torch.add", "add_",
                                                 "into_input"])),
                act=draw(activations()), seed=s)))
            shapes.append((sc, sh, sw))
        elif kind == "cat":
            same = [j for j, v in enumerate(shapes) if v[1:] == (sh, sw)]
            parts = [src] + draw(st.lists(st.sampled_from(same), min_size=1, max_size=2))
            total = sum(shapes[j][0] for j in parts)
            groups = [g for g in (2, 3) if total % g == 0]
            shuffle = draw(st.sampled_from([0, 0] + groups))
            steps.append(("cat", parts, dict(shuffle=shuffle)))
            shapes.append((total, sh, sw))
        elif kind == "split" and sc >= 2:
            form = draw(st.sampled_from(["chunk", "split", "narrow"]))
            first = (sc + 1) // 2 if form == "chunk" else draw(st.integers(1, sc - 1))
            steps.append(("split", [src], dict(form=form, first=first)))
            shapes += [(first, sh, sw), (sc - first, sh, sw)]
        elif kind == "pool" and min(sh, sw) >= 2:
            k = draw(st.sampled_from([2, 3]))
            stride = draw(st.sampled_from([1, 2, k]))
            pad = draw(st.integers(0, k // 2))
            ceil = draw(st.booleans()) and stride == 1
            pool = dict(kind=draw(st.sampled_from(["max", "avg", "avg_valid"])),
                        form=draw(st.sampled_from(["module", "function"])), k=k,
                        stride=stride, pad=pad, ceil=ceil)
            oh, ow = _out(sh, k, stride, pad, 1), _out(sw, k, stride, pad, 1)
            if ceil:
                oh, ow = sh + 2 * pad - k + 1, sw + 2 * pad - k + 1
            if min(oh, ow) < 1:
                continue
            steps.append(("pool", [src], pool))
            shapes.append((sc, oh, ow))
            if draw(st.booleans()):  # a pool projection
                p, shape = draw(conv_params(sc, oh, ow, s + 7, k=1, groups=1))
                p.update(stride=1, pad=0, dil=1)
                steps.append(("conv", [len(shapes) - 1], p))
                shapes.append((p["cout"], oh, ow))
        elif kind == "se":
            steps.append(("se", [src], dict(
                c=sc, r=draw(st.integers(1, max(1, sc // 2))),
                pool=draw(st.sampled_from(["module", "function", "mean"])),
                act=draw(st.sampled_from(["relu", "silu"])),
                gate=draw(st.sampled_from(["sigmoid", "hardsigmoid"])), seed=s)))
            shapes.append((sc, sh, sw))
            tail = draw(st.sampled_from([None, "residual", "conv"]))
            if tail == "residual":
                steps.append(("add", [len(shapes) - 1, src], dict(act=draw(activations()),
                                                                  c=sc)))
                shapes.append((sc, sh, sw))
            elif tail == "conv":
                p, shape = draw(conv_params(sc, sh, sw, s + 9, groups=1))
                steps.append(("conv", [len(shapes) - 1], p))
                shapes.append(shape)
        elif kind == "inplace":
            steps.append(("inplace", [src], dict(
                kind=draw(st.sampled_from(["relu_", "slice_mul_", "narrow_add_", "iadd",
                                           "setitem", "select_zero_"])),
                k=draw(st.integers(1, sc)))))
        elif kind == "view":
            steps.append(("view", [src], dict(form=draw(st.sampled_from(
                ["view", "reshape", "flatten"])))))
            shapes.append((sc, sh, sw))
        elif kind == "act":
            steps.append(("act", [src], dict(act=draw(activations(allow_none=False)), c=sc)))
            shapes.append((sc, sh, sw))
        elif kind == "siblings":
            act = draw(activations())
            for j in range(draw(st.integers(2, 3))):
                p, shape = draw(conv_params(sc, sh, sw, s + j, k=1, groups=1, reparam=False))
                p.update(stride=1, pad=0, dil=1, act=act)
                steps.append(("conv", [src], p))
                shapes.append((p["cout"], sh, sw))
        elif kind == "dense":
            growth, layers = draw(st.integers(1, 3)), draw(st.integers(2, 3))
            steps.append(("dense", [src], dict(c=sc, growth=growth, layers=layers, seed=s)))
            shapes.append((sc + growth * layers, sh, sw))
    if len(shapes) == 1:  # no step made a value
        steps.append(("act", [0], dict(act=("relu", "function"))))
        shapes.append((c, h, w))
    extra = draw(st.lists(st.integers(1, len(shapes) - 1), max_size=2, unique=True))
    return dict(input=(n, c, h, w), steps=steps, outputs=extra,
                default_arg=draw(st.integers(0, 5)) == 0)
