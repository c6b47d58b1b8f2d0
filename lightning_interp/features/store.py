"""Per-latent accumulators of a feature pass: bounded memory, whatever the corpus length.

Every accumulator is a fixed-size tensor with first dimension ``F = d_latent``; a batch is
merged in and the tensors keep their shapes, so memory is ``O(F * (T * W + Q * S * W + R +
B))`` plus one batch, independent of the number of tokens read.

Definitions (what the tests compare against a dense brute force):

- A latent *fires* on a kept token when its activation there is > 0.
- An *example* is a (context, latent) pair: the latent's maximum over the kept tokens of
  the context, at its first position. **Top examples** are the ``T`` largest, ties broken by
  the earlier token of the corpus (what a stable sort of the whole pass gives).
- **Quantile examples** follow delphi's ``split_activation_quantiles`` (EleutherAI delphi,
  ``latents/samplers.py``): bin ``b`` of ``Q`` holds examples whose activation lies in
  ``(b/Q, (b+1)/Q]`` of the latent's maximum; from each bin the ``S`` examples with the
  smallest seeded hash key are kept (bottom-k sampling: a uniform sample without
  replacement, independent of batch boundaries, so a resumed pass keeps the same ones).
  Bins follow the running maximum: an example dropped while the maximum was lower can be
  missing from a bin later (exact when the maximum is reached before the bin fills).
- **Deciles** come from a bottom-``R`` hash sample of each latent's firings (exact while
  the latent fired at most ``R`` times; store.json says ``"exact"`` or ``"estimated"``).
- **Correlated latents**: Jaccard index of firing, ``|i and j| / |i or j|``, over a
  bottom-``R2`` hash sample of kept tokens (exact while the pass is at most ``R2`` tokens).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lightning_interp.dictionaries.sparse_codes import SparseCodes

_U64 = 1 << 64


def _signed(value: int) -> int:
    return value - _U64 if value >= 1 << 63 else value


# SplitMix64's constants, as the signed int64 torch multiplies with (wrapping).
_GOLDEN, _M1, _M2 = (
    _signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
)


def _shr(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: Tensor) -> Tensor:
    """SplitMix64's finaliser: int64 in, well-mixed int64 out (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def hash_keys(source: Tensor, salt: Tensor | int, seed: int) -> Tensor:
    """Seeded uniform keys in ``[0, 1)`` (float64) of ``(source, salt)`` pairs."""
    z = _mix(_mix(torch.as_tensor(salt, dtype=torch.long) + seed) ^ source.long())
    return _shr(z, 11).double() / float(1 << 53)


@dataclass(frozen=True)
class FeatureSettings:
    """What a feature pass records (all in store.json; a resumed pass must match them).

    Attributes:
        top_k: Top examples per latent (``T``).
        window: Tokens per example window (``W``).
        quantile_bins: Activation-quantile bins of sampled examples (``Q``).
        per_quantile: Examples sampled per bin (``S``).
        logit_lens: Tokens in each logit-lens table (``L``).
        correlated: Correlated latents kept per latent (``C``).
        histogram_bins: Bins of the log10-activation histogram (``B``).
        log10_min: Lower edge of the histogram (log10 of the activation).
        log10_max: Upper edge of the histogram.
        value_sample: Firings sampled per latent for the deciles (``R``).
        token_sample: Kept tokens sampled for co-firing (``R2``).
        seed: Seed of every sample.
    """

    top_k: int = 20
    window: int = 32
    quantile_bins: int = 10
    per_quantile: int = 5
    logit_lens: int = 10
    correlated: int = 10
    histogram_bins: int = 60
    log10_min: float = -3.0
    log10_max: float = 3.0
    value_sample: int = 256
    token_sample: int = 4096
    seed: int = 0

    def to_dict(self) -> dict[str, int | float]:
        """The settings as JSON-ready values."""
        return asdict(self)

    @property
    def center(self) -> int:
        """Index of the activating token in a window: three quarters in, to show what led to it."""
        return min(3 * self.window // 4, self.window - 1)


def _groups(latents: Tensor) -> tuple[Tensor, Tensor]:
    """``(unique latents [n], index matrix [n, M])`` of entries sorted by latent; -1 padding."""
    unique, counts = torch.unique_consecutive(latents, return_counts=True)
    group = torch.repeat_interleave(torch.arange(len(unique)), counts)
    starts = torch.cumsum(counts, 0) - counts
    offset = torch.arange(len(latents)) - starts[group]
    matrix = torch.full((len(unique), int(counts.max()) if len(counts) else 0), -1)
    matrix[group, offset] = torch.arange(len(latents))
    return unique, matrix


def _pick(values: Tensor, matrix: Tensor, fill: float) -> Tensor:
    """``values[matrix]`` with ``fill`` where ``matrix`` is -1."""
    return values[matrix.clamp(min=0)].masked_fill(matrix < 0, fill)


class FeatureAccumulator:
    """The per-latent state of a feature pass; :meth:`update` merges one capture batch.

    Args:
        d_latent: Number of latents ``F``.
        settings: What to record.
    """

    #: Accumulator tensors, saved by name in a checkpoint.
    NAMES = (
        "count act_sum act_max histogram sample_values sample_keys top_values top_tokens "
        "top_activations top_source quantile_values quantile_keys quantile_tokens "
        "quantile_activations quantile_source row_keys row_latents"
    ).split()

    def __init__(self, d_latent: int, settings: FeatureSettings) -> None:
        self.d_latent, self.settings = d_latent, settings
        s, f = settings, d_latent
        qs = s.quantile_bins * s.per_quantile
        inf = float("inf")
        self.count = torch.zeros(f, dtype=torch.long)
        self.act_sum = torch.zeros(f, dtype=torch.float64)
        self.act_max = torch.zeros(f)
        self.histogram = torch.zeros(f, s.histogram_bins, dtype=torch.long)
        self.sample_values = torch.zeros(f, s.value_sample)
        self.sample_keys = torch.full((f, s.value_sample), inf, dtype=torch.float64)
        self.top_values = torch.zeros(f, s.top_k)
        self.top_tokens = torch.full((f, s.top_k, s.window), -1, dtype=torch.int32)
        self.top_activations = torch.zeros(f, s.top_k, s.window, dtype=torch.float16)
        self.top_source = torch.full((f, s.top_k), -1, dtype=torch.long)
        self.quantile_values = torch.zeros(f, qs)
        self.quantile_keys = torch.full((f, qs), inf, dtype=torch.float64)
        self.quantile_tokens = torch.full((f, qs, s.window), -1, dtype=torch.int32)
        self.quantile_activations = torch.zeros(f, qs, s.window, dtype=torch.float16)
        self.quantile_source = torch.full((f, qs), -1, dtype=torch.long)
        self.row_keys = torch.full((s.token_sample,), inf, dtype=torch.float64)
        self.row_latents = torch.full((s.token_sample, 1), -1, dtype=torch.long)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Tensor]:
        """Every accumulator tensor by name (contiguous, for safetensors)."""
        return {name: getattr(self, name).contiguous() for name in self.NAMES}

    def load(self, tensors: dict[str, Tensor]) -> None:
        """Restore the tensors :meth:`state` returned."""
        for name in self.NAMES:
            setattr(self, name, tensors[name].clone())

    def nbytes(self) -> int:
        """Bytes held by the accumulators."""
        return sum(t.numel() * t.element_size() for t in self.state().values())

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, codes: SparseCodes, input_ids: Tensor, row_index: Tensor, first: int) -> None:
        """Merge one capture batch.

        Args:
            codes: Sparse codes of the batch's kept tokens, in row-major (context, position)
                order.
            input_ids: ``[contexts, context_size]`` token ids of the batch.
            row_index: ``[contexts, context_size]`` row of ``codes`` at each position, -1
                at positions not kept (special tokens, padding, past the token limit).
            first: Index of the batch's first context in the whole pass; a token's global
                index (its ``source``) is ``context * context_size + position``.
        """
        values, indices = codes.values.float().cpu(), codes.indices.cpu()
        n_ctx, ctx = input_ids.shape
        flat_pos = (row_index.reshape(-1) >= 0).nonzero().squeeze(1)  # kept flat positions
        row_source = flat_pos + first * ctx
        rows, latents, acts = SparseCodes(values, indices, codes.d_latent).coo()
        firing = acts > 0
        rows, latents, acts = rows[firing], latents[firing], acts[firing]
        self._stats(rows, latents, acts, row_source)
        self._cofiring(indices.masked_fill(values <= 0, -1), row_source)
        if not len(rows):
            return
        # Sorted (row, latent) keys: the window lookup is a searchsorted.
        lookup = rows * self.d_latent + latents
        lookup, order = lookup.sort()
        lookup_acts = acts[order]
        batch = _Batch(input_ids.cpu(), row_index.cpu(), lookup, lookup_acts, first, self)
        examples = batch.examples(flat_pos[rows], latents, acts)
        self._merge_top(examples, batch)
        self._merge_quantiles(examples, batch)

    def _stats(self, rows: Tensor, latents: Tensor, acts: Tensor, source: Tensor) -> None:
        s = self.settings
        self.count += torch.bincount(latents, minlength=self.d_latent)
        self.act_sum.index_add_(0, latents, acts.double())
        self.act_max.scatter_reduce_(0, latents, acts, reduce="amax")
        span = s.log10_max - s.log10_min
        bins = ((acts.log10() - s.log10_min) / span * s.histogram_bins).floor().long()
        bins = bins.clamp(0, s.histogram_bins - 1)
        flat = torch.bincount(latents * s.histogram_bins + bins, minlength=self.histogram.numel())
        self.histogram += flat.view_as(self.histogram)
        # Bottom-R hash sample of each latent's firings, for the deciles.
        keys = hash_keys(source[rows], latents, s.seed)
        keep = keys < self.sample_keys[latents, -1]
        latents, keys, acts = latents[keep], keys[keep], acts[keep]
        order = torch.argsort(latents, stable=True)
        unique, matrix = _groups(latents[order])
        keys, acts = keys[order], acts[order]
        pool_keys = torch.cat([self.sample_keys[unique], _pick(keys, matrix, float("inf"))], 1)
        pool_vals = torch.cat([self.sample_values[unique], _pick(acts, matrix, 0.0)], 1)
        best = pool_keys.argsort(dim=1, stable=True)[:, : s.value_sample]
        self.sample_keys[unique] = pool_keys.gather(1, best)
        self.sample_values[unique] = pool_vals.gather(1, best)

    def _cofiring(self, indices: Tensor, source: Tensor) -> None:
        """Bottom-R2 hash sample of kept tokens, with their firing latents."""
        keys = hash_keys(source, -1, self.settings.seed)
        width = max(self.row_latents.shape[1], indices.shape[1])
        pad = torch.nn.functional.pad
        old = pad(self.row_latents, (0, width - self.row_latents.shape[1]), value=-1)
        new = pad(indices, (0, width - indices.shape[1]), value=-1)
        all_keys = torch.cat([self.row_keys, keys])
        best = all_keys.argsort(stable=True)[: self.settings.token_sample]
        self.row_keys = all_keys[best]
        self.row_latents = torch.cat([old, new])[best]

    def _merge_top(self, ex: dict[str, Tensor], batch: _Batch) -> None:
        t = self.settings.top_k
        keep = ex["value"] > self.top_values[ex["latent"], -1]
        ex = {k: v[keep] for k, v in ex.items()}  # still sorted by (latent, source)
        if not len(ex["latent"]):
            return
        unique, matrix = _groups(ex["latent"])
        pool = torch.cat([self.top_values[unique], _pick(ex["value"], matrix, -1.0)], 1)
        # Stable: on ties the held examples (earlier in the corpus) come first.
        order = torch.argsort(-pool, dim=1, stable=True)[:, :t]
        self._place("top", unique, order, matrix, ex, batch, pool.gather(1, order), None)

    def _merge_quantiles(self, ex: dict[str, Tensor], batch: _Batch) -> None:
        s = self.settings
        q, per = s.quantile_bins, s.per_quantile
        unique, matrix = _groups(ex["latent"])
        top = self.act_max[unique][:, None]
        values = torch.cat([self.quantile_values[unique], _pick(ex["value"], matrix, 0.0)], 1)
        keys = torch.cat([self.quantile_keys[unique], _pick(ex["key"], matrix, float("inf"))], 1)
        bins = (values / top * q).ceil().long().sub(1).clamp(0, q - 1)
        bins = bins.masked_fill(keys.isinf(), q)  # empty slots and padding sort last
        order = torch.argsort(bins.double() * 2 + keys, dim=1, stable=True)
        sorted_bins = bins.gather(1, order)
        position = torch.arange(order.shape[1]).expand_as(order)
        start = (
            torch.where(
                torch.cat(
                    [
                        torch.ones_like(sorted_bins[:, :1], dtype=torch.bool),
                        sorted_bins[:, 1:] != sorted_bins[:, :-1],
                    ],
                    1,
                ),
                position,
                torch.zeros_like(position),
            )
            .cummax(1)
            .values
        )
        rank = position - start
        chosen = (rank < per) & (sorted_bins < q)
        # Slot bin * S + rank of each chosen pool entry; unchosen slots stay empty.
        slots = torch.full((len(unique), q * per), -1)
        row, col = chosen.nonzero(as_tuple=True)
        slots[row, sorted_bins[row, col] * per + rank[row, col]] = order[row, col]
        empty = slots < 0
        slots = slots.clamp(min=0)
        self._place("quantile", unique, slots, matrix, ex, batch, values.gather(1, slots), empty)
        self.quantile_keys[unique] = keys.gather(1, slots).masked_fill(empty, float("inf"))

    def _place(
        self,
        prefix: str,
        unique: Tensor,
        order: Tensor,
        matrix: Tensor,
        ex: dict[str, Tensor],
        batch: _Batch,
        new_values: Tensor,
        empty: Tensor | None,
    ) -> None:
        """Write the chosen pool entries into ``prefix``'s slots.

        ``order[i, j]`` is the pool column for slot ``j`` of latent ``unique[i]``: below the
        number of held slots a held example, else new example ``matrix[i, column - held]``
        (whose window is cut from the batch now); ``empty`` marks slots left empty.
        """
        held = getattr(self, f"{prefix}_values").shape[1]
        identity = torch.arange(order.shape[1]).expand_as(order)
        moved = (order != identity) | (order >= held)
        if empty is not None:
            moved = (moved & ~empty) | (empty & (getattr(self, f"{prefix}_source")[unique] >= 0))
        changed = moved.any(1)
        if not changed.all():  # rows left as they were cost nothing
            unique, order, matrix = unique[changed], order[changed], matrix[changed]
            new_values = new_values[changed]
            empty = None if empty is None else empty[changed]
        tokens = getattr(self, f"{prefix}_tokens")[unique]
        acts = getattr(self, f"{prefix}_activations")[unique]
        source = getattr(self, f"{prefix}_source")[unique]
        idx = order.clamp(max=held - 1)
        out_tokens = tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[2]))
        out_acts = acts.gather(1, idx[..., None].expand(-1, -1, acts.shape[2]))
        out_source = source.gather(1, idx)
        new = order >= held
        if empty is not None:
            new &= ~empty
        r, c = new.nonzero(as_tuple=True)
        picked = matrix[r, order[r, c] - held]
        win_tokens, win_acts = batch.windows(ex["position"][picked], ex["latent"][picked])
        out_tokens[r, c], out_acts[r, c] = win_tokens, win_acts
        out_source[r, c] = ex["source"][picked]
        if empty is not None:
            out_tokens[empty], out_acts[empty], out_source[empty] = -1, 0, -1
            new_values = new_values.masked_fill(empty, 0.0)
        getattr(self, f"{prefix}_values")[unique] = new_values
        getattr(self, f"{prefix}_tokens")[unique] = out_tokens
        getattr(self, f"{prefix}_activations")[unique] = out_acts
        getattr(self, f"{prefix}_source")[unique] = out_source


class _Batch:
    """One capture batch's tokens and sparse codes, for examples and their windows."""

    def __init__(
        self,
        input_ids: Tensor,
        row_index: Tensor,
        lookup: Tensor,
        lookup_acts: Tensor,
        first: int,
        acc: FeatureAccumulator,
    ) -> None:
        self.ids, self.row_index = input_ids, row_index
        self.lookup, self.lookup_acts, self.first = lookup, lookup_acts, first
        self.d_latent, self.settings = acc.d_latent, acc.settings

    def examples(self, flat_pos: Tensor, latents: Tensor, acts: Tensor) -> dict[str, Tensor]:
        """Per (context, latent): the max firing and its first position; sorted by latent."""
        ctx = self.ids.shape[1]
        context = flat_pos // ctx
        # Order by (latent, context, -activation, position) with stable sorts, last key first.
        order = torch.argsort(flat_pos, stable=True)
        order = order[torch.argsort(-acts[order], stable=True)]
        order = order[torch.argsort(context[order], stable=True)]
        order = order[torch.argsort(latents[order], stable=True)]
        pair = latents[order] * (1 << 32) + context[order]
        head = torch.ones_like(pair, dtype=torch.bool)
        head[1:] = pair[1:] != pair[:-1]
        chosen = order[head]
        source = flat_pos[chosen] + self.first * ctx
        return {
            "latent": latents[chosen],
            "value": acts[chosen],
            "position": flat_pos[chosen],
            "source": source,
            "key": hash_keys(source, latents[chosen], self.settings.seed + 1),
        }

    def windows(self, flat_pos: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids and the latent's activations over each example's window."""
        s = self.settings
        n_ctx, ctx = self.ids.shape
        context, centre = flat_pos // ctx, flat_pos % ctx
        offsets = torch.arange(s.window) - s.center
        pos = centre[:, None] + offsets
        inside = (pos >= 0) & (pos < ctx)
        pos = pos.clamp(0, ctx - 1)
        tokens = self.ids[context[:, None], pos].masked_fill(~inside, -1).int()
        rows = self.row_index[context[:, None], pos]
        query = rows * self.d_latent + latents[:, None]
        at = torch.searchsorted(self.lookup, query).clamp(max=max(len(self.lookup) - 1, 0))
        found = (self.lookup[at] == query) & inside & (rows >= 0)
        acts = self.lookup_acts[at].masked_fill(~found, 0.0)
        return tokens, acts.half()
