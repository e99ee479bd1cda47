"""Reading compiled GPU code without a GPU: ptxas's resource usage and the SASS of a cubin
(cuobjdump), which global accesses of a PTX kernel go through a given parameter (a taint walk
over the PTX), and whether a Triton kernel's TTGIR software-pipelines its whole reduction.

Everything here parses text, so the rules can be unit-tested on snippets
(tests/bench/test_static.py); cnnfuse.bench.static runs them on the real kernels.
"""
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# --- cuobjdump -----------------------------------------------------------------------------


def cuobjdump() -> str:
    """The cuobjdump binary: Triton's bundled one, else $CUDA_HOME/bin, else PATH.
    Raises FileNotFoundError if there is none."""
    candidates = []
    try:
        import triton
        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
                          / "cuobjdump")
    except ImportError:
        pass
    candidates.append(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump")
    for path in candidates:
        if path.is_file():
            return str(path)
    found = shutil.which("cuobjdump")
    if found:
        return found
    raise FileNotFoundError("no cuobjdump (Triton's bundled one, $CUDA_HOME/bin or PATH)")


def run_cuobjdump(*flags_and_path) -> str:
    """`cuobjdump <flags> <path>` (flags "-res-usage", "-sass" or both: one call prints
    both, which the parsers below read apart); its stdout."""
    return subprocess.run([cuobjdump(), *map(str, flags_and_path)], check=True,
                          capture_output=True, text=True).stdout


@dataclass(frozen=True)
class Resources:
    """ptxas's figures for one kernel: registers per thread, stack frame and local memory
    per thread (bytes; spills live there), static shared memory per block (bytes)."""
    registers: int
    stack: int
    local: int
    shared: int

    @property
    def spill_bytes(self) -> int:
        return self.stack + self.local


_RES = re.compile(r"Function\s+([^\s:]+)\s*:\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+"
                  r"LOCAL:(\d+)")


def parse_res_usage(text: str) -> dict:
    """`cuobjdump -res-usage` output -> {mangled function name: Resources}."""
    return {m[1]: Resources(int(m[2]), int(m[3]), int(m[5]), int(m[4]))
            for m in _RES.finditer(text)}


_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$", re.M)


def split_sass(text: str) -> dict:
    """`cuobjdump -sass` output -> {mangled function name: its SASS}."""
    marks = list(_FUNCTION.finditer(text))
    return {m[1]: text[m.end():marks[i + 1].start() if i + 1 < len(marks) else len(text)]
            for i, m in enumerate(marks)}


# --- SASS ----------------------------------------------------------------------------------

# Width suffixes of LDG / LDGSTS / STG; none means 32 bits. Cache hints such as LTC128B are
# not widths, hence whole dot-separated tokens only.
_WIDTH = {"128": 16, "64": 8, "32": 4, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
_MEMOP = re.compile(r"\b(LDGSTS|LDG|STG)((?:\.[A-Z0-9_]+)*)")


def _width(suffixes: str) -> int:
    widths = [_WIDTH[t] for t in suffixes.split(".") if t in _WIDTH]
    return widths[-1] if widths else 4


@dataclass(frozen=True)
class SassSummary:
    """What one kernel's SASS shows. mma: "HGMMA" (Hopper warpgroup MMA), "HMMA" (the
    older warp MMA) or "none"; widest_load / widest_store: the widest LDG or LDGSTS and STG in
    bytes (0 if none); tma: a UTMALDG (tensor-memory-accelerator load) is present;
    local_ops: STL + LDL instructions (spill traffic)."""
    mma: str
    widest_load: int
    widest_store: int
    tma: bool
    local_ops: int


def summarise_sass(sass: str) -> SassSummary:
    loads, stores = [0], [0]
    for op, suffixes in _MEMOP.findall(sass):
        (stores if op == "STG" else loads).append(_width(suffixes))
    mma = ("HGMMA" if re.search(r"\bHGMMA\b", sass) else
           "HMMA" if re.search(r"\bHMMA\b", sass) else "none")
    return SassSummary(mma, max(loads), max(stores), bool(re.search(r"\bUTMALDG\b", sass)),
                       len(re.findall(r"\b(?:STL|LDL)\b", sass)))


def warps_per_sm(registers: int, warps_per_block: int, shared_bytes: int) -> int:
    """Theoretical resident warps per SM on sm_90: 64 warps, 32 blocks, 64K registers
    (allocated per warp in units of 256, per thread in units of 8) and 228 KiB of shared
    memory (1 KiB reserved per block)."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = min(32, 64 // warps_per_block, 65536 // (regs_per_warp * warps_per_block))
    if shared_bytes:
        blocks = min(blocks, 228 * 1024 // (shared_bytes + 1024))
    return blocks * warps_per_block


# --- PTX: which accesses go through a parameter ------------------------------------------

_REG = re.compile(r"%[A-Za-z_][\w]*")
_NO_DEST = ("st.", "red.", "cp.", "bar", "membar", "fence", "prefetch", "tensormap.",
            "mbarrier.", "barrier", "ret", "bra", "exit", "trap", "griddepcontrol", "setmaxnreg",
            "wgmma.fence", "wgmma.commit", "wgmma.wait")
# results that are values read from memory, not addresses derived from the parameter
_VALUE_RESULT = ("ld.global", "ld.shared", "ld.local", "ld.const", "ldmatrix", "ldu", "atom.",
                 "wgmma.mma_async", "shfl")
_BITS = re.compile(r"\.[bfsu](8|16|32|64|128)\b")


def _statements(ptx: str):
    """(opcode, operands) of each PTX instruction; predicates, labels, directives dropped."""
    text = re.sub(r"//[^\n]*", "", ptx)
    # directives (.loc has no semicolon) and the entry's parameter list are not instructions
    text = "\n".join(line for line in text.splitlines()
                     if not line.strip().startswith((".", "(", ")")))
    for raw in text.split(";"):
        s = raw.strip().lstrip("{}").strip()
        s = re.sub(r"^(\$?[\w.]+:\s*)+", "", s).strip().lstrip("{}").strip()
        if not s or s.startswith("."):
            continue
        s = re.sub(r"^@!?%\w+\s+", "", s)
        parts = s.split(None, 1)
        yield parts[0], _operands(parts[1] if len(parts) > 1 else "")


def _operands(text: str) -> list:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


@dataclass(frozen=True)
class ParamAccess:
    """The global accesses whose address derives from one kernel parameter: the widths in
    bytes of its loads (ld.global, cp.async) and stores (st.global), and whether it is read
    or written by the tensor memory accelerator (cp.async.bulk.tensor)."""
    loads: tuple
    stores: tuple
    tma_load: bool
    tma_store: bool

    @property
    def widest_load(self) -> int:
        return max(self.loads, default=0)

    @property
    def widest_store(self) -> int:
        return max(self.stores, default=0)


def _access_width(opcode: str) -> int:
    vec = re.search(r"\.v(\d+)\b", opcode)
    bits = _BITS.findall(opcode)
    return (int(vec[1]) if vec else 1) * (int(bits[-1]) if bits else 32) // 8


def param_access(ptx: str, param_index: int) -> ParamAccess:
    """Taint walk over the PTX: registers computed from parameter `param_index` (its
    ld.param, or a mov of its address for a descriptor passed by value) and from registers so
    computed are addresses into that tensor; a global access through one of them is the
    tensor's. Values loaded from memory are not followed. A descriptor built in the kernel
    (tensormap.replace of its global address) makes the descriptor's address tainted too."""
    param = re.compile(rf"\b\w+_param_{param_index}\b")
    stmts = list(_statements(ptx))
    tainted: set = set()
    changed = True
    while changed:
        changed = False
        for op, args in stmts:
            if not args:
                continue
            if op.startswith("tensormap.replace") and "global_address" in op and len(args) > 1:
                if set(_REG.findall(args[-1])) & tainted or param.search(args[-1]):
                    new = set(_REG.findall(args[0])) - tainted
                    if new:
                        tainted |= new
                        changed = True
                continue
            if op.startswith(_NO_DEST) or op.startswith(_VALUE_RESULT):
                continue
            sources = " ".join(args[1:])
            if param.search(sources) or set(_REG.findall(sources)) & tainted:
                new = set(_REG.findall(args[0])) - tainted
                if new:
                    tainted |= new
                    changed = True

    def through(operand: str) -> bool:
        return bool(set(_REG.findall(operand)) & tainted or param.search(operand))
    loads, stores, tma_load, tma_store = [], [], False, False
    for op, args in stmts:
        if op.startswith("cp.async.bulk.tensor") and len(args) >= 2:
            if ".global.shared" in op:  # global <- shared: a TMA store
                tma_store |= through(args[0])
            else:
                tma_load |= through(args[1])
        elif op.startswith("cp.async.") and ".global" in op and len(args) >= 3:
            if through(args[1]):
                loads.append(int(args[2], 0))
        elif op.startswith("ld.global") and len(args) >= 2 and through(args[1]):
            loads.append(_access_width(op))
        elif op.startswith("st.global") and args and through(args[0]):
            stores.append(_access_width(op))
    return ParamAccess(tuple(loads), tuple(stores), tma_load, tma_store)


# --- TTGIR: is the whole reduction one pipelined loop? ------------------------------------

_DOT = re.compile(r"\b(tt\.dot|ttng\.warp_group_dot|ttng\.tc_gen5_mma)\b(?!_)")
_ASYNC_COPY = re.compile(r"\b(ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local"
                         r"|ttng\.async_tma_gather)\b")
_WAIT = re.compile(r"\b(ttg\.async_wait|ttng\.wait_barrier)\b")


def _loops(ttgir: str):
    """For each line, the ids of the scf.for loops around it (outermost first), and for each
    loop id the line it starts on."""
    stack, enclosing, starts = [], [], {}
    for number, line in enumerate(ttgir.splitlines()):
        enclosing.append(tuple(i for i in stack if i is not None))
        text = re.sub(r'"[^"]*"', "", line)
        # the loop's region opens with the last brace on its line (earlier ones belong to
        # attributes in the result types, e.g. #ttg.slice<{dim = 0, ...}>)
        region = text.rfind("{") if re.search(r"\bscf\.for\b", text) else -1
        for at, ch in enumerate(text):
            if ch == "{":
                if at == region:
                    starts[number] = number
                    stack.append(number)
                else:
                    stack.append(None)
            elif ch == "}" and stack:
                stack.pop()
    return enclosing, starts


def whole_reduction_pipelined(ttgir: str) -> bool:
    """True when the TTGIR after Triton's pipeliner has one main loop for the whole
    reduction: every MMA (tt.dot, ttng.warp_group_dot) lies in one and the same scf.for, that
    loop lies in no other scf.for (a loop per kernel tap nested around a channel loop fails),
    and it is software-pipelined: async copies (cp.async or TMA) are issued inside it and
    waited for inside it, with copies issued before it (the pipeline's prologue) or a
    warp-specialised producer loop issuing them. An unrolled per-tap sequence of channel
    loops fails too (MMAs in several loops)."""
    lines = ttgir.splitlines()
    enclosing, _ = _loops(ttgir)
    dot_loops = {enclosing[i][-1] if enclosing[i] else None
                 for i, line in enumerate(lines) if _DOT.search(line)}
    if len(dot_loops) != 1 or None in dot_loops:
        return False
    (main,) = dot_loops
    inside = [i for i in range(len(lines)) if main in enclosing[i]]
    if enclosing[main] != ():  # nested in another scf.for
        return False
    copies_in = any(_ASYNC_COPY.search(lines[i]) for i in inside)
    waits_in = any(_WAIT.search(lines[i]) for i in inside)
    prologue = any(_ASYNC_COPY.search(lines[i]) for i in range(main) if not enclosing[i])
    producer = "ttg.warp_specialize" in ttgir and any(
        _ASYNC_COPY.search(line) for i, line in enumerate(lines)
        if enclosing[i] and main not in enclosing[i])
    return (copies_in and waits_in and prologue) or (waits_in and producer)
