"""FusionGraph: the FX graph a pass rewrites, with the module table and the queries every pass
asks (who reads a node, how often a module is called, whether anything in between writes)."""
import operator
from typing import Optional

import torch
from torch import fx, nn

from .patterns import may_alias_input, may_mutate
from .report import FusionReport


class FusionGraph:
    """One traced module under rewrite: `gm` and its `graph`, `modules` by qualified name,
    `calls` (how many call sites each module has), the `report` and the site `prefix`."""

    def __init__(self, gm: fx.GraphModule, report: FusionReport, prefix: str):
        self.gm, self.graph, self.report, self.prefix = gm, gm.graph, report, prefix
        # whether the original's conv weights are channels_last (eager then returns that)
        self.model_channels_last = False
        self.modules = dict(gm.named_modules())
        self.calls = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    def site(self, node: fx.Node) -> str:
        """The module path `explain` names for a call_module node."""
        return self.prefix + node.target

    def node_site(self, node: fx.Node) -> str:
        """The site `explain` names for any node: a call_module's path, else the innermost
        module whose forward made the node, with the node's name ("features.1 (add_10)")."""
        if node.op == "call_module":
            return self.site(node)
        stack = node.meta.get("nn_module_stack") or {}
        path = next(reversed(stack.values()))[0] if stack else ""
        inner = (self.prefix + path).rstrip(".")
        return f"{inner} ({node.name})" if inner else node.name

    def module(self, node) -> Optional[nn.Module]:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def modules_of(self, kind):
        """The call_module nodes whose module is a `kind` when the iteration reaches them, in
        graph order; the graph may be rewritten meanwhile (erased nodes are passed over)."""
        for node in list(self.graph.nodes):
            if not getattr(node, "_erased", False) and isinstance(self.module(node), kind):
                yield node

    def called_once(self, node: fx.Node) -> bool:
        return self.calls.get(node.target, 1) == 1

    def replace_module(self, qualname: str, new: nn.Module) -> None:
        parent, _, name = qualname.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, name, new)
        self.modules[qualname] = new

    @staticmethod
    def sole_user(node: fx.Node) -> Optional[fx.Node]:
        """The one node reading `node`, if it reads it as its only tensor input."""
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        return user if user.args and user.args[0] is node else None

    def absorb(self, node: fx.Node, into: fx.Node) -> None:
        """`node` computes nothing more than `into` now does: its readers read `into`."""
        node.replace_all_uses_with(into)
        self.graph.erase_node(node)

    def mutation_between(self, first: fx.Node, last: fx.Node, ignore=()) -> bool:
        """Whether a node after `first` and before `last`, other than those in `ignore`, may
        write into a tensor."""
        node = first.next
        while node is not last and node.op != "root":
            if node not in ignore and may_mutate(node, self.modules):
                return True
            node = node.next
        return False

    def aliases(self, nodes, stop=()) -> set:
        """Every node whose value may share storage with one of `nodes`: their views and the
        views of those, and what they are views of, transitively (not past `stop`)."""
        seen, todo = set(), list(nodes)
        while todo:
            node = todo.pop()
            if node in seen or not isinstance(node, fx.Node):
                continue
            seen.add(node)
            if node in stop:
                continue
            todo += [u for u in node.users if u.args and u.args[0] is node
                     and may_alias_input(u, self.modules)]
            if node.args and isinstance(node.args[0], fx.Node) and may_alias_input(
                    node, self.modules):
                todo.append(node.args[0])
        return seen

    def written(self, nodes) -> bool:
        """Whether any node may write into a tensor sharing storage with one of `nodes` (an
        in-place op, an `out=`, a module with inplace=True reading any alias of them)."""
        aliases = self.aliases(nodes)
        return any(may_mutate(u, self.modules) for a in aliases for u in a.users)

    def private_to(self, node: fx.Node, user: fx.Node) -> bool:
        """Whether `user` is the only reader of `node` and nothing else shares its storage:
        a write into it by `user` is then seen by no one else."""
        return (node.op not in ("placeholder", "get_attr") and set(node.users) == {user}
                and self.aliases([node], stop={user}) <= {node, user})

    def escapes(self, node: fx.Node) -> bool:
        """Whether `node`, or a view of it, is returned from the graph (the caller may write
        into it)."""
        return any(u.op == "output" for a in self.aliases([node]) for u in a.users)

    def reshape_not_view(self, node: fx.Node) -> None:
        """The passes hand out channels_last buffers and channel slices where eager code had
        contiguous tensors; `.view` on them may fail where `.reshape` gives the same values.
        Only where nothing writes through either: a reshape may copy, a view never does
        (the layout pass restores eager's layout for the views left)."""
        if self.written([node]):
            return
        for user in list(node.users):
            if (user.op == "call_method" and user.target == "view" and user.args[0] is node
                    and not any(isinstance(a, torch.dtype) for a in user.args[1:])):
                user.target = "reshape"

    def erase_unused(self, nodes) -> None:
        """Erase the given nodes once nothing reads them (in any order), and the shape
        arithmetic that fed only them."""
        pending, erased, progress = list(nodes), set(), True
        while pending and progress:
            progress = False
            for node in list(pending):
                if node in erased:
                    pending.remove(node)
                elif not node.users:
                    inputs = node.all_input_nodes
                    self.graph.erase_node(node)
                    erased.add(node)
                    pending.remove(node)
                    progress = True
                    pending += [a for a in inputs if a not in erased and _shape_arithmetic(a)]


def _shape_arithmetic(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "size") or (
        node.op == "call_function"
        and node.target in (operator.getitem, operator.floordiv, operator.mul, getattr))
