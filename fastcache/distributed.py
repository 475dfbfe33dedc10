"""Identical cache decisions on every rank of a multi-device run, with no host sync.

In a sequence-parallel run (Ulysses / ring attention: diffusers' ``ContextParallelConfig``,
xDiT) each rank holds a shard of the tokens. A cache decision taken from a rank's own
shard differs between ranks: ranks then skip different steps, and the collectives inside
the blocks deadlock or the shards diverge. ``fastcache.patch(model, config,
process_group=group)`` makes every rank decide from the same numbers:

* a policy whose decision reads the hidden states (TeaCache, First-Block Cache, EOC on a
  TeaCache base; ``Policy.decides_from_data = True``) passes its indicator sums through
  :meth:`DecisionGroup.reduce` before the fused decision op;
* the reduction is an all-gather of each rank's ``(num, den)`` partial sums
  (``sum|I_s - I_{s-1}|``, ``sum|I_{s-1}|``; docs/methods.md, TeaCache and First-Block
  Cache) followed by a fixed-order sum over the ranks in fp64, on every rank. Every rank
  adds the same values in the same order, so the reduced sums, and with them the
  decisions, are bitwise identical on all ranks by construction, whatever algorithm the
  backend uses (a backend all-reduce gives no such guarantee in writing, and NCCL may pick
  another algorithm per message size or topology);
* under ``torch.compile`` the collective is torch.distributed's functional
  ``all_gather_single`` + ``wait_tensor``, which dynamo traces (``fullgraph=True``: 0 graph
  breaks); in eager mode it is the synchronous ``all_gather_into_tensor`` (the same values,
  cheaper per call). Neither reads a value to the host; both run before the skip's
  ``torch.cond``, never inside a branch (NCCL inside a captured conditional node is reported
  broken);
* static-schedule policies (FORA, EOC on a FORA or mask base; ``decides_from_data =
  False``) decide from the step alone and take identical decisions by construction: the
  group is accepted and nothing is reduced.

Relation to a single-process run on the whole sequence: the reduced sum is
``sum_r (sum_b partial[r, b])`` while one process sums the same elements in the op's own
chunk order, so the two agree up to fp32 rounding (a relative difference of order 1e-7),
not bitwise. A decision can differ from the single-process one only when the accumulated
distance lies within that rounding of the threshold; the ranks never differ from each
other. Tested over 20-step loops: tests/runtime/test_distributed.py.

Requirements on the caller: every rank calls the patched model the same number of times,
in the same cache contexts, with the same timesteps (a sampling loop driven by one
scheduler does); each call then makes exactly one collective per decision.
"""

from __future__ import annotations

import torch

__all__ = ["DecisionGroup", "group_from_model", "resolve_group"]


def _dist():
    import torch.distributed as dist

    return dist


class DecisionGroup:
    """A process group the cache decisions are reduced over (see the module docstring).

    ``group``: a ``torch.distributed.ProcessGroup`` this rank belongs to (for example
    ``dist.group.WORLD`` or ``dist.new_group(ranks)``). ``world_size`` / ``rank`` /
    ``backend`` are read once, here, on the host.

    A deep copy shares the group (a copied patched model in the same process decides
    with the same peers); pickling is refused (a process group cannot be sent elsewhere).
    """

    def __init__(self, group):
        dist = _dist()
        if not dist.is_available():
            raise RuntimeError("fastcache: process_group given but torch.distributed is not available in this build")
        if not dist.is_initialized():
            raise RuntimeError(
                "fastcache: process_group given but torch.distributed is not initialized; call "
                "torch.distributed.init_process_group(...) on every rank before fastcache.patch(..., process_group=...)"
            )
        if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group(ranks) returns on a rank outside ranks
            raise ValueError(
                f"fastcache: this process (global rank {dist.get_rank()}) is not a member of the process_group "
                "(dist.new_group returned NON_GROUP_MEMBER here); pass a group that contains every rank running "
                "this model"
            )
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                "fastcache: process_group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD "
                f"or torch.distributed.new_group(ranks)), got {type(group).__name__}: {group!r}"
            )
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(
                f"fastcache: this process (global rank {dist.get_rank()}) is not a member of the process_group "
                f"(ranks {dist.get_process_group_ranks(group)}); pass a group that contains every rank running "
                "this model"
            )
        self.group = group
        self.rank = rank
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))

    def reduce(self, sums: torch.Tensor) -> torch.Tensor:
        """This rank's indicator sums ``(B, 2)`` (or ``(2,)``) -> the group's ``(1, 2)`` sums.

        Each rank first adds its own batch rows in order (so ranks may hold different batch
        sizes: whole different samples per rank), in fp64; the ``(W, 2)`` all-gather is then
        summed rank by rank in fp64, identically on every rank. Returned in fp64 (the
        decision op rounds it to fp32 once). No host read; traceable by dynamo.
        """
        part = self.local_sum(sums)
        # A group of one rank still gathers: the same code path on every world size.
        if torch.compiler.is_compiling():
            import torch.distributed._functional_collectives as fc

            gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor  # torch >= 2.13 renamed it
            gathered = fc.wait_tensor(gather(part, 0, self.group))
        else:
            # Eager: the synchronous c10d collective, the same gathered values. On gloo it costs a
            # fraction of the functional one (whose async wrapper and wait add ~3 ms per call on
            # the loaded 2-core test machine; bench/bench_distributed.py). With NCCL it is queued
            # on the stream like the functional one: no host sync, capturable.
            gathered = part.new_empty((self.world_size, 2))
            _dist().all_gather_into_tensor(gathered, part, group=self.group)
        return self.combine(gathered)

    @staticmethod
    def local_sum(sums: torch.Tensor) -> torch.Tensor:
        """``(B, 2)`` -> ``(1, 2)`` fp64: this rank's rows added in order (B is a shape: static)."""
        local = sums.detach().reshape(-1, 2).to(torch.float64)
        part = local[0]
        for b in range(1, local.shape[0]):
            part = part + local[b]
        return part.reshape(1, 2)

    @staticmethod
    def combine(gathered: torch.Tensor) -> torch.Tensor:
        """``(W, 2)`` gathered rows -> ``(1, 2)``: added in rank order, the same on every rank."""
        total = gathered[0]
        for r in range(1, gathered.shape[0]):
            total = total + gathered[r]
        return total.reshape(1, 2)

    def describe(self) -> dict:
        """For ``fastcache.stats``: which group the decisions are reduced over."""
        return {"world_size": self.world_size, "rank": self.rank, "backend": self.backend}

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        raise TypeError(
            "fastcache: a model patched with a process_group cannot be pickled (a process group is local to this "
            "process); handle.remove() first, then patch the loaded model with its own process_group"
        )

    def __repr__(self) -> str:
        return f"DecisionGroup(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r})"


def group_from_model(model) -> object | None:
    """The process group of a diffusers model's parallel setup (``ModelMixin.enable_parallelism``),
    or None when the model has none.

    Context parallelism (Ulysses / ring): the group of the flattened ("ring", "ulysses")
    mesh, i.e. every rank holding a shard of the sequence. Tensor parallelism only: the
    tensor-parallel mesh's group (the ranks hold replicated hidden states; reducing over
    them keeps the decisions identical even if a replicated value differs in its last bit).
    """
    pc = getattr(model, "_parallel_config", None)
    if pc is None:
        return None
    cp = getattr(pc, "context_parallel_config", None)
    if cp is not None:
        mesh = getattr(cp, "_flattened_mesh", None)
        if mesh is None:
            raise RuntimeError(
                f"fastcache: {type(model).__name__} has a context-parallel config without its device mesh (set up by "
                "enable_parallelism); call model.enable_parallelism(config=...) before fastcache.patch"
            )
        return mesh.get_group()
    tp = getattr(pc, "tensor_parallel_config", None)
    mesh = getattr(tp, "_mesh", None) if tp is not None else None
    if mesh is not None:
        return mesh.get_group() if mesh.ndim == 1 else mesh._flatten().get_group()
    return None


def resolve_group(model, process_group) -> DecisionGroup | None:
    """``process_group`` (a ProcessGroup, or None = the model's diffusers parallel group if
    it has one) as a :class:`DecisionGroup`, or None for a single-process run."""
    if isinstance(process_group, DecisionGroup):
        return process_group
    if process_group is None:
        process_group = group_from_model(model)
        if process_group is None:
            return None
    return DecisionGroup(process_group)


def check_policy(policy, group: DecisionGroup | None) -> None:
    """Refuse a policy that does not say whether its decisions read the data, when the
    group has more than one rank (its ranks could take different decisions)."""
    if group is None or group.world_size == 1:
        return
    declared = getattr(type(policy), "decides_from_data", None)
    if declared is None:
        raise TypeError(
            f"fastcache: {type(policy).__name__} does not declare whether its cache decisions read the hidden "
            f"states (Policy.decides_from_data), so it cannot run on a process group of {group.world_size} ranks: "
            "its ranks could decide differently. A static schedule sets `decides_from_data = False`; a policy "
            "deciding from data sets True and passes its indicator sums through `self.reduce_sums(sums)` "
            "before deciding."
        )
