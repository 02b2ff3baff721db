"""The contracts every memforge component meets, one Protocol per kind.

A *kind* is a slot in a model: the parametric memory network, the objective (the loss that
measures how badly the memory predicts a value), the optimizer (how that loss's gradient becomes
a step), the retention (how much old memory is kept), the retrieval rule that reads it, the
projection that turns hidden states into queries/keys/values, the memory layer (a stateful token
mixer, e.g. the fast-weight layer built from the six kinds before it), the short-term attention,
the feed-forward layer, and the integration strategy that joins them into a block. Which kinds
a component builds from is declared on its :class:`~memforge.registry.ComponentSpec`
(``requires``/``optional``), so a spec that sets a kind no component of a layer uses is refused
instead of silently ignored (docs/architecture.md).

Besides the one Protocol per kind, *capabilities* are Protocols a component may also satisfy
(:class:`ReadsMemory`, :class:`DecodesMemoryStatically`, :class:`ComposesAttention`, ...). A
component that needs one from another checks it where it is built or used, and the error names
the component and the missing capability (:func:`memforge.capabilities.require`).

Components are plain ``torch.nn.Module`` objects that satisfy these Protocols structurally: a plugin
never subclasses anything from memforge (torchtune's "no implementation inheritance"). Factories
receive their frozen config and a :class:`BuildContext` and return a module; modules themselves take
plain constructor arguments and never see a config object.

Shape conventions used below:

* ``B`` batch, ``T`` time, ``D`` model width, ``H`` heads, ``d`` per-head width.
* ``N = B * H``: the memory kernels flatten batch and heads, because every sequence and every head
  owns an independent fast-weight memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import attrs
from torch import Tensor, nn

#: Every kind a :class:`~memforge.spec.ModelSpec` can choose a component for, in build order.
KINDS: tuple[str, ...] = (
    "memory",
    "objective",
    "optimizer",
    "retention",
    "retrieval",
    "projection",
    "memory_layer",
    "attention",
    "feedforward",
    "integration",
)

#: Kinds that only memory-bearing layers use; a pure attention model may leave them unset.
MEMORY_KINDS: tuple[str, ...] = ("memory", "objective", "optimizer", "retention", "retrieval",
                                 "projection", "memory_layer")

#: The reads a :class:`ChunkReader` can offer, by method name.
READS: tuple[str, ...] = ("at_chunk_start", "before_write", "after_write")

#: A ``linear(i, h)`` callback: apply the network's ``i``-th weight matrix to ``h`` of shape
#: ``[N, t, d_in_i]`` and return ``[N, t, d_out_i]``. The memory kernels supply it, so a memory
#: network never needs to know which (chunk-start, per-token exact, transposed) weights it reads.
LinearFn = Callable[[int, Tensor], Tensor]


@attrs.frozen(kw_only=True)
class BuildContext:
    """What a component factory learns about the place it is built for.

    Attributes:
        dim: model width ``D``.
        heads: number of heads ``H`` (attention and memory share it).
        head_dim: per-head width ``d = D // H``.
        layer_index: index of the block being built (0-based).
        num_layers: number of blocks in the model.
        vocab_size: vocabulary size of the model.
        build: ``build(kind) -> nn.Module`` builds the spec's choice of another kind for the
            same layer (its per-layer choice where it has one); an integration's factory calls it
            for its memory layer, attention and feed-forward, a memory layer's for its parts.
            Only the kinds the component declares (``requires``/``optional``) may be built.
        component_name: ``component_name(kind)`` is the registered name of the spec's choice of
            ``kind`` for the same layer (``None`` where the spec sets none), for a component
            that describes itself by its parts' names (``memforge show``'s rule line).
    """

    dim: int
    heads: int
    head_dim: int
    layer_index: int
    num_layers: int
    vocab_size: int
    build: Callable[[str], nn.Module] = attrs.field(eq=False, repr=False)
    component_name: Callable[[str], str | None] = attrs.field(
        default=lambda kind: None, eq=False, repr=False)


@runtime_checkable
class MemoryNetwork(Protocol):
    """Kind ``memory``: the parametric long-term memory ``M``, used functionally.

    The network's *initial* weights are outer (learned) parameters; the memory kernels copy them
    per sequence and then update the copies at test time. All of the network's fast weights are
    matrices applied through the ``linear`` callback, so a per-token gradient of weight ``i`` is the
    outer product ``inputs_i[t]^T @ grads_i[t]`` and a chunk of such gradients is one batched matmul.
    Element-wise parts (activations, residuals, norms) live in :meth:`forward` and :meth:`backward`.

    :meth:`backward` is optional: a network without one gets a backward derived by autograd
    (:func:`memforge.engine.derived_backward.with_backward`), provided it applies every fast-weight
    matrix exactly once through ``linear`` and reads no fast weight otherwise (checked when the
    memory is built). A hand-written one is a speed-up, compared with the derived one by the
    conformance kit.

    Declared capability (attribute, read by the executors' dispatch): ``linear_map: bool``
    (default ``False``): the network is exactly one matrix, ``M(x) = x W_0`` (no residual, norm
    or bias), what the token-exact WY executor needs.
    """

    def initial_weights(self) -> Sequence[Tensor]:
        """The learned initial fast weights, one ``[H, d_in_i, d_out_i]`` tensor per matrix."""
        ...

    def forward(self, x: Tensor, linear: LinearFn) -> tuple[Tensor, Any]:
        """Run ``M`` on ``x`` ``[N, t, d_key]`` and return ``(y [N, t, d_value], tape)``.

        ``tape`` is whatever :meth:`backward` needs (pre-activations, inputs of each matrix).
        """
        ...

    def backward(
        self, tape: Any, grad_output: Tensor, linear_transposed: LinearFn
    ) -> list[tuple[Tensor, Tensor]]:
        """Back-propagate ``grad_output`` ``[N, t, d_value]`` through the forward that made ``tape``.

        Optional (see the class docstring); outer gradients must flow through it (build it from
        differentiable torch ops). ``linear_transposed(i, g)`` applies weight ``i`` transposed.
        Returns, for each weight ``i``,
        ``(inputs_i [N, t, d_in_i], grads_i [N, t, d_out_i])`` such that the gradient of token
        ``t``'s loss with respect to weight ``i`` is ``inputs_i[:, t, :, None] * grads_i[:, t, None, :]``.
        """
        ...


#: Exactness tiers of a learning rule's fast path (docs/memory.md, "Exactness tiers"):
#: ``token-exact`` (each token's step uses the state after every earlier token), ``chunk-start``
#: (each token's gradient is taken at the state at the start of its chunk; momentum, retention
#: and reads still run per token; equals token-exact at chunk size 1) and ``rule-specific`` (an
#: approximation a paper chose for parallel training, documented by the rule).
TIERS: tuple[str, ...] = ("token-exact", "chunk-start", "rule-specific")


class StepGates(NamedTuple):
    """Per-token gates of an optimiser, each ``[B, T, H]``.

    Attributes:
        lr: step size ``theta_t >= 0`` on the token's gradient.
        momentum: ``eta_t`` in ``[0, 1]``, how much of the past update is carried; ``None`` means
            no momentum (plain gradient descent, exactly ``eta = 0``).
    """

    lr: Tensor
    momentum: Tensor | None


class ObjectiveInputs(NamedTuple):
    """Per-token inputs of an objective, each ``[B, T, H]`` or ``None`` when the objective has none.

    Attributes:
        side: a per-token, per-head input of the loss (Yaad's Huber threshold ``delta_t``); passed
            to :meth:`Objective.loss` / :meth:`Objective.loss_grad` as ``side`` ``[..., t]``.
        window: ``gamma_t`` in ``[0, 1]``, the weight of token ``t``'s pair in every window that
            contains it (ATLAS' Omega rule); ``None`` weighs every pair 1.
    """

    side: Tensor | None
    window: Tensor | None


@runtime_checkable
class Objective(Protocol):
    """Kind ``objective``: the loss of one (key, value) pair, and which pairs a token's step sums.

    A token's step descends ``sum_{i = t - c + 1}^{t} gamma_i * loss(M(k_i), v_i; side_i)`` with
    ``c = window`` (``1``: the online rule, the token's own pair). ``loss_grad`` is the loss's
    gradient with respect to the memory's *output*; the executor back-propagates it through the
    memory network. The loss is not the optimiser: step sizes and momentum are the
    :class:`Optimizer`'s.

    Declared capabilities (class attributes, read by the executors' dispatch):

    * ``window: int`` (default 1): ``c``, pairs per step.
    * ``squared_error: bool`` (default ``False``): the loss is exactly ``0.5 * ||p - t||^2``
      (what the token-exact WY executor needs).
    """

    def loss(self, prediction: Tensor, target: Tensor, side: Tensor | None) -> Tensor:
        """Per-token loss ``[..., t]`` of ``prediction`` against ``target`` (both ``[..., t, d]``);
        ``side`` ``[..., t]`` is the token's :attr:`ObjectiveInputs.side` (``None`` without one)."""
        ...

    def loss_grad(self, prediction: Tensor, target: Tensor, side: Tensor | None) -> Tensor:
        """``d loss / d prediction`` for every token, shaped like ``prediction``."""
        ...

    def forward(self, x: Tensor) -> ObjectiveInputs:
        """The per-token inputs for the layer input ``x`` ``[B, T, D]``."""
        ...


@runtime_checkable
class Optimizer(Protocol):
    """Kind ``optimizer``: how a token's gradient becomes a step of the fast weights.

    With ``u_t`` the gradient of the token's objective at the weights its tier prescribes::

        S_t = eta_t * S_{t-1} + theta_t * u_t        (S_t = theta_t * u_t without momentum)
        W_t = keep_t * W_{t-1} - transform(S_t)      (transform: identity unless declared)

    ``forward`` gives the gates. An optimiser whose step is linear in past gradients (GD, momentum)
    has nothing more; one that is not (Muon) also has the capability :class:`TransformsUpdate`,
    which only the executors that can apply it run.

    Declared capability (attribute): ``uses_momentum: bool`` (default ``True``, since nothing
    says otherwise): ``False`` promises that ``forward`` never returns momentum gates (plain
    gradient descent), what the token-exact WY executor needs.
    """

    def forward(self, x: Tensor) -> StepGates:
        """Step sizes (and momentum) for the layer input ``x`` ``[B, T, D]``."""
        ...


@runtime_checkable
class TransformsUpdate(Protocol):
    """Capability of an optimiser: a non-linear map of the update before it is applied (Muon's
    Newton-Schulz orthogonalisation of the momentum).

    ``applies_at`` (class attribute) is ``"token"`` (every token's update; the chunk-start tier)
    or ``"chunk_end"`` (once per chunk, to the chunk's summed update; rule-specific tier).
    """

    applies_at: str

    def transform(self, update: Tensor) -> Tensor:
        """The update ``[N, d_in, d_out]`` of one fast-weight matrix, transformed (same shape)."""
        ...


@runtime_checkable
class FactorsThroughGram(Protocol):
    """Capability of an optimiser with a ``"token"`` :class:`TransformsUpdate`: its transform is a
    matrix function of the update's Gram matrix applied to the update, ``transform(S) = R(X X^T)
    X`` with ``X`` the wide orientation of ``S`` (``S`` when ``d_in <= d_out``, else ``S^T``,
    transposed back), as Newton-Schulz is.

    With chunk-start reads the sequential executor then never builds a weight-sized matrix per
    token: every token's momentum is the carried momentum plus a weighted sum of the chunk's
    rank-one gradients, so its Gram matrix, and the chunk's summed transformed update, follow
    from small products of the gradients' factors (docs/memory.md, "The sequential executor").
    """

    def gram_factor(self, gram: Tensor) -> Tensor:
        """``R`` ``[..., m, m]`` for ``gram = X X^T`` ``[..., m, m]``, so that ``transform``'s
        result is ``R @ X`` (in ``X``'s orientation)."""
        ...


@runtime_checkable
class Retention(Protocol):
    """Kind ``retention``: how the old state is kept (Titans' forgetting, GDN's decay).

    ``forward`` returns the scalar decay per token and head *in log space*: ``log_keep_t <= 0``
    ``[B, T, H]``, the log of the fraction of the state kept at token ``t`` (Titans'
    ``log(1 - alpha_t)``), or ``None`` for full retention (exactly ``keep = 1``). Log space keeps
    near-full forgetting finite: ``keep = 0`` is a large negative number with a finite gradient,
    never ``log(0)``.

    Declared capability (class attribute): ``decay_before_gradient: bool`` (default ``False``):
    the token's gradient is taken at the *decayed* state ``keep_t * W_{t-1}`` (GDN), instead of
    at ``W_{t-1}`` with the decay applied after the step (Titans). A retention that is not a scalar
    decay (ℓq normalisation, KL, row renormalisation) also has :class:`ProjectsWeights`.
    ``full_retention: bool`` (default ``False``): ``forward`` always returns ``None`` (no decay,
    so the order of decay and gradient does not matter; the WY executor runs it).
    """

    def forward(self, x: Tensor) -> Tensor | None:
        """``log_keep`` ``[B, T, H]`` (``<= 0``) for the layer input ``x`` ``[B, T, D]``, or ``None``."""
        ...


@runtime_checkable
class ProjectsWeights(Protocol):
    """Capability of a retention: a map of the fast weights after a step (Moneta's ℓq
    normalisation, Memora's softmax onto a scaled simplex, LaCT's row renormalisation).

    ``applies_at`` (class attribute) is ``"token"`` or ``"chunk_end"`` (as the paper's parallel
    form does; rule-specific tier when chunks are longer than one token).

    ``mirror`` (class attribute, default ``False``): the projection is a mirror map. The executor
    then carries the unprojected state ``D`` (the network's initial-weight parameters hold its
    start), applies the decayed steps to ``D`` and uses ``W = project(D)`` for gradients and
    reads (Moneta's ``W = f(A)``, Memora's ``W = c softmax(L)``); without it the projection maps
    ``W`` itself.

    ``initial_dual(weights)`` (optional method, mirror maps only): the dual to start from, given
    the network's freshly drawn initial ``weights``. A layer built with it calls it once at
    construction and stores the result in their place. Returning the projection's inverse
    (``project(initial_dual(W)) = W``) starts the memory at the draw rather than at its
    projection, which for a link that rescales (Moneta's ℓq link shrinks a Gaussian draw) is far
    from the scale the network was drawn for. Called without gradients, once.
    """

    applies_at: str

    def project(self, weights: tuple[Tensor, ...], initial: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The fast weights ``[N, d_in_i, d_out_i]`` after the projection; ``initial`` are the
        weights at the start of the sequence (for a renormalisation to their norms)."""
        ...


@runtime_checkable
class ReadsAtChunkStart(Protocol):
    """A reader that can read a chunk's queries with the weights at the start of their chunk."""

    def at_chunk_start(self, queries: Tensor) -> Tensor:
        """Read every query ``[N, t, d]`` with the weights at the start of its chunk."""
        ...


@runtime_checkable
class ReadsBeforeWrite(Protocol):
    """A reader that can read query ``t`` with the exact weights ``M_{t-1}``."""

    def before_write(self, queries: Tensor) -> Tensor:
        """Read query ``t`` with the exact weights ``M_{t-1}`` (before token ``t`` writes)."""
        ...


@runtime_checkable
class ReadsAfterWrite(Protocol):
    """A reader that can read query ``t`` with the exact weights ``M_t``."""

    def after_write(self, queries: Tensor) -> Tensor:
        """Read query ``t`` with the exact weights ``M_t`` (after token ``t`` writes)."""
        ...


@runtime_checkable
class ChunkReader(ReadsAtChunkStart, ReadsBeforeWrite, ReadsAfterWrite, Protocol):
    """What a memory kernel offers a retrieval rule for one chunk of queries ``[N, t, d]``.

    Each read is a capability of its own (:data:`READS`): a kernel offers the reads it can (a
    token-exact kernel has no chunk-start weights to offer), a retrieval rule declares the reads
    it calls (:func:`retrieval_reads`), and a memory layer that takes a retrieval rule refuses,
    at build time, one that needs a read its kernel lacks
    (:func:`memforge.capabilities.require_reads`). The Titans kernel offers all three. Every read
    is pure: none of them changes any weight, momentum or cache.
    """


@runtime_checkable
class RetrievalRule(Protocol):
    """Kind ``retrieval``: which weights a token reads. Never writes the memory.

    A rule may set the class attribute ``reads`` to the :class:`ChunkReader` methods it calls
    (a tuple of names from :data:`READS`); without it, every read is assumed. A rule may set the
    class attribute ``reads_within_chunk = False`` to promise that it only ever calls
    ``reader.at_chunk_start``: fixed-shape decoding then computes a chunk's surprises once,
    when the chunk completes, instead of one per token for reads that never come (a rule that
    breaks the promise gets an error, not a wrong read). Without the attribute, ``True`` is assumed.
    """

    def forward(self, reader: ChunkReader, queries: Tensor) -> Tensor:
        """Return the read-out ``[N, t, d_value]`` for ``queries`` ``[N, t, d_key]``."""
        ...


def retrieval_reads(rule: object) -> frozenset[str]:
    """The :class:`ChunkReader` reads ``rule`` declares it calls (its ``reads`` attribute; all of
    :data:`READS` when it declares none)."""
    return frozenset(getattr(type(rule), "reads", READS))


@runtime_checkable
class Projection(Protocol):
    """Kind ``projection``: turns hidden states into per-head queries, keys and values.

    ``forward(x, cache)`` takes ``x`` ``[B, T, D]`` and the cache returned by the previous call for
    the same sequences (``None`` at the start) and returns ``(q, k, v, cache)`` with ``q, k, v`` shaped
    ``[B, H, T, d]``. Causal: output ``t`` depends on inputs ``<= t`` only.
    """

    def forward(self, x: Tensor, cache: Any | None) -> tuple[Tensor, Tensor, Tensor, Any]: ...


@runtime_checkable
class MemoryLayer(Protocol):
    """Kind ``memory_layer``: a stateful token mixer, the memory of a block.

    ``forward(x, state)`` maps ``x`` ``[B, T, D]`` to ``(y [B, T, D], state)``; ``state`` is
    ``None`` at the start of a sequence and whatever the layer returned for the previous piece of
    the same sequences afterwards, so that feeding a sequence in pieces equals feeding it whole.
    Causal: ``y[:, t]`` depends on ``x[:, :t + 1]`` only.

    ``chunk_size`` is the period of the layer's internal cycle (the tokens whose update is
    computed together): fixed-shape decoding tells the layer when a cycle completes. A token-exact
    layer reports ``chunk_size = 1``: a token-recurrent one, and one whose chunked kernel gives the
    token loop's result at any chunk (its ``static_decode_phase`` is always 0); it keeps that
    kernel chunk under a name of its own. Integrations (``titans.lmm``, ``titans.mac``, ...) take
    any memory layer; what more they need is a capability: :class:`ReadsMemory` (MAC),
    :class:`DecodesMemoryStatically` (compiled generation), :class:`CompilesSteps`.
    """

    chunk_size: int

    def forward(self, x: Tensor, state: Any | None) -> tuple[Tensor, Any]: ...


@runtime_checkable
class ReadsMemory(Protocol):
    """Capability of a memory layer: read its memory without writing (what ``titans.mac`` needs).

    A *snapshot* is the memory as it stands (for a fast-weight memory, its current weights), a
    tensor or a tuple of tensors; reading it changes nothing, and a read with the same snapshot
    and queries always gives the same result.
    """

    def read_state(self, state: Any | None, batch: int) -> Any:
        """The snapshot of the memory after every token ``state`` has written (``None``: the
        memory before any token, for ``batch`` sequences). Pure: ``state`` is not changed."""
        ...

    def read(self, queries: Tensor, snapshot: Any) -> Tensor:
        """Per-head queries ``[B, H, T, d]`` read from ``snapshot``: ``[B, H, T, d]``, the raw
        memory output (no norm, gate or projection: the caller decides what to do with it)."""
        ...


@runtime_checkable
class DecodesMemoryStatically(Protocol):
    """Capability of a memory layer: decode one token at a time with fixed-shape buffers.

    The integration's :meth:`DecodesStatically.static_decode_start` asks the layer for its buffers
    and its phase in its cycle of :attr:`MemoryLayer.chunk_size` tokens; every step then says
    whether the token completes that cycle. A step must equal ``forward`` on the same token with
    the state the buffers hold (up to float rounding).
    """

    def static_decode_buffers(self, state: Any, batch: int) -> Any:
        """Fixed-shape buffers holding ``state`` (after at least one token); copies, so the
        decode never changes ``state`` itself."""
        ...

    def static_decode_phase(self, state: Any) -> int:
        """Tokens of the current cycle ``state`` has read (``0 <= phase < chunk_size``)."""
        ...

    def static_decode_step(self, x: Tensor, buffers: Any, completes_chunk: bool) -> Tensor:
        """One token ``x`` ``[B, 1, D]``: update ``buffers`` in place and return ``[B, 1, D]``."""
        ...


@runtime_checkable
class ReadsMemoryStatically(Protocol):
    """Capability of a memory layer that both reads (:class:`ReadsMemory`) and decodes with fixed
    shapes (:class:`DecodesMemoryStatically`): the snapshot its decode buffers hold."""

    def static_read_state(self, buffers: Any) -> Any:
        """The :meth:`ReadsMemory.read_state` snapshot of the memory in ``buffers``, valid right
        after a step that completed a cycle (views into the buffers: copy it to keep it)."""
        ...


class RuleDescription(NamedTuple):
    """A memory layer's learning rule in words (what ``memforge show`` prints per layer).

    Attributes:
        objective: the loss a step descends (a component name, or a short phrase).
        retention: how old memory is kept (``"none"`` without decay).
        optimizer: how a gradient becomes a step.
        schedule: which tokens update together (``"chunks of 64"``, ``"token by token"``).
        tier: the exactness tier, one of :data:`TIERS`.
        executor: the kernel that runs the rule (``"closed_form"``, ``"sequential"``, ``"wy"``).
    """

    objective: str
    retention: str
    optimizer: str
    schedule: str
    tier: str
    executor: str


@runtime_checkable
class DescribesRule(Protocol):
    """Capability of a memory layer: say which learning rule it runs, at which tier, on which
    executor (docs/memory.md, "Executors")."""

    def describe_rule(self) -> RuleDescription:
        """The layer's rule, schedule, tier and executor."""
        ...


#: The series an inspected memory layer may emit (docs/inspect.md), with their shapes: ``[B, H, T]``
#: per token and head, ``[B, H, T, D]`` for ``read_output``. A layer emits those it has and may
#: add series of its own (namespaced, e.g. ``"delta.beta"``).
INSPECT_SERIES: dict[str, str] = {
    "surprise": "norm of the token's gradient of the inner loss (Titans' momentary surprise)",
    "step_size": "the token's step size theta (write strength)",
    "momentum": "the token's momentum gate eta",
    "decay": "the token's forgetting gate alpha (fraction of the memory forgotten at the token)",
    "state_norm": "Frobenius norm of the memory after the token has written",
    "read_output": "the head's share of the layer's output at the token (vector of width D; "
                   "the shares of all heads sum to the output)",
}


@runtime_checkable
class MemoryRecorder(Protocol):
    """Receives what an inspected memory layer computes (``memforge.inspect.recording``)."""

    def record(self, series: str, values: Tensor) -> None:
        """Take ``values`` of the named series for the ``T`` tokens of this call: ``[B, H, T]``
        (``[B, H, T, D]`` for ``read_output``), detached. Called once per series and call."""
        ...


@runtime_checkable
class InspectsMemory(Protocol):
    """Capability of a memory layer: emit its internals per token and head while inspected.

    ``memforge.inspect.recording(model)`` hands each such layer a :class:`MemoryRecorder` and
    takes it back (``None``) on leaving. A layer keeps it in one attribute and, in ``forward``,
    records only when that attribute is not ``None``: not being inspected then costs one
    attribute check. Recording must not change any output bit: the layer records tensors it
    computes anyway, and computes anything more from detached copies, after its own result.
    """

    #: The series names (:data:`INSPECT_SERIES` or the layer's own) the layer emits.
    inspect_series: tuple[str, ...]

    def set_memory_recorder(self, recorder: MemoryRecorder | None) -> None:
        """Record into ``recorder`` from the next ``forward`` on (``None``: stop recording)."""
        ...


@runtime_checkable
class Attention(Protocol):
    """Kind ``attention``: short-term causal self-attention with an incremental cache.

    ``forward(x, cache)`` maps ``[B, T, D]`` to ``[B, T, D]``; ``cache`` is ``None`` at the start of a
    sequence and is returned updated, holding only what later tokens can still see.
    """

    def forward(self, x: Tensor, cache: Any | None) -> tuple[Tensor, Any]: ...


@runtime_checkable
class ComposesAttention(Protocol):
    """Capability of an attention component: its parts, for blocks that attend with their own
    keys and mask (``titans.mac`` attends over ``[persistent | retrieved | segment]``)."""

    def project_qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q, k, v`` ``[B, H, T, d]`` of ``x`` ``[B, T, D]`` at ``positions`` ``[T]`` (rotated
        if the component uses positions)."""
        ...

    def persistent_kv(self) -> tuple[Tensor, Tensor] | None:
        """Keys and values ``[1, H, P, d]`` of the persistent tokens, or ``None`` without any."""
        ...

    def output(self, o: Tensor) -> Tensor:
        """Heads ``[B, H, T, d]`` merged and projected to ``[B, T, D]``."""
        ...


@runtime_checkable
class DecodesAttentionStatically(Protocol):
    """Capability of an attention component: decode one token at a time with fixed-shape buffers
    (see :class:`DecodesStatically`); :func:`memforge.nn.static_attention_buffers` checks it."""

    def static_decode_buffers(self, cache: Any, batch: int, capacity: int) -> Any:
        """Fixed-shape buffers holding ``cache`` for up to ``capacity`` more tokens (copies)."""
        ...

    def static_decode_step(self, x: Tensor, buffers: Any) -> Tensor:
        """Attend one token ``x`` ``[B, 1, D]`` on ``buffers`` (updated in place)."""
        ...


@runtime_checkable
class FeedForward(Protocol):
    """Kind ``feedforward``: the position-wise MLP of a block, ``[B, T, D] -> [B, T, D]``."""

    def forward(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class Block(Protocol):
    """Kind ``integration``: one residual block of the model (memory and/or attention, FFN).

    ``forward(hidden, state)`` maps ``[B, T, D]`` to ``[B, T, D]``. ``state`` is ``None`` at the
    start of a sequence; the block returns its new state (a tuple/NamedTuple of tensors) so that
    feeding a sequence in pieces with the state carried equals feeding it whole.
    """

    def forward(self, hidden: Tensor, state: Any | None) -> tuple[Tensor, Any]: ...


@runtime_checkable
class CompilesSteps(Protocol):
    """A module whose forward loops over steps (chunks) and can compile the step, not the loop.

    ``torch.compile`` of such a module as a whole unrolls its Python loop: one large graph per
    sequence length, compiled for minutes. :func:`memforge.compile_model` instead asks every
    module that has this method to compile its own step (one graph per step shape, reused by every
    step) and to hide the loop from the outer compile. Results must agree with eager up to float
    rounding, and a test should show it.
    """

    def compile_steps(self, enabled: bool = True) -> None:
        """Run the step compiled from now on (``enabled=False``: eager again)."""
        ...


class StaticDecodeStart(NamedTuple):
    """Where a block's fixed-shape decode starts (:meth:`DecodesStatically.static_decode_start`).

    Attributes:
        buffers: tensors (tuples/NamedTuples of them) that hold the block's state with shapes that
            never change; the block's steps update them in place. Copies: the block's state is
            never changed.
        phases: the block's position in each of its cycles (e.g. tokens of the current memory
            chunk so far, tokens of the current segment so far).
        periods: the length of each cycle, in the same order.
    """

    buffers: Any
    phases: tuple[int, ...]
    periods: tuple[int, ...]


@runtime_checkable
class DecodesStatically(Protocol):
    """A block that decodes one token at a time with fixed-shape buffers (compiled generation).

    Incremental decoding through ``forward`` grows caches by one row per token, so each step has
    new shapes. A block with these two methods instead keeps its state in buffers of constant
    shape (caches at full capacity with the filled part masked, the memory's unfinished chunk at
    full chunk size) and writes one row per step in place, so :class:`memforge.decoding.StaticDecoder`
    can compile the whole model step once. The decoder counts positions in Python and tells each
    step which of the block's cycles it completes, so a compiled step branches on Python bools
    (one graph per combination), never on tensor values. A step must equal ``forward`` on the
    same token with the state the buffers hold (up to float rounding), and a test should show it.
    """

    def static_decode_start(self, state: Any, batch: int, capacity: int) -> StaticDecodeStart:
        """Buffers, phases and periods for continuing ``state`` (after at least one token) by up
        to ``capacity`` tokens (what a cache that grows with the length must make room for)."""
        ...

    def static_decode_step(self, hidden: Tensor, buffers: Any, completes: tuple[bool, ...]) -> Tensor:
        """Read ``hidden`` ``[B, 1, D]``; update ``buffers`` in place; return ``[B, 1, D]``.

        ``completes[i]`` is whether this token ends cycle ``i`` of the block's ``periods``.
        """
        ...
