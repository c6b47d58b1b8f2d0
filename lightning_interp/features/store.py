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
        firing_indices = indices.masked_fill(values <= 0, -1)
        self._cofiring(firing_indices, row_source)
        if not len(rows):
            return
        # Sorted (row, latent) keys: the window lookup is a searchsorted.
        lookup = rows * self.d_latent + latents
        lookup, order = lookup.sort()
        batch = _Batch(input_ids.cpu(), row_index.cpu(), lookup, acts[order], first, self)
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
        # Slots are unordered during the pass; the weakest held example is the bar to pass.
        keep = ex["value"] > self.top_values.min(1).values[ex["latent"]]
        ex = {k: v[keep] for k, v in ex.items()}  # still sorted by (latent, source)
        if not len(ex["latent"]):
            return
        unique, matrix = _groups(ex["latent"])
        pool = torch.cat([self.top_values[unique], _pick(ex["value"], matrix, -1.0)], 1)
        last = torch.iinfo(torch.long).max
        source = torch.cat([self.top_source[unique], _pick(ex["source"], matrix, last)], 1)
        order = _by_value_then_source(pool, source)[:, :t]
        chosen = torch.zeros_like(pool, dtype=torch.bool).scatter_(1, order, True)
        self._replace("top", unique, chosen, matrix, ex, batch)

    def _merge_quantiles(self, ex: dict[str, Tensor], batch: _Batch) -> None:
        s = self.settings
        unique, matrix = _groups(ex["latent"])
        top = self.act_max[unique][:, None]
        values = torch.cat([self.quantile_values[unique], _pick(ex["value"], matrix, 0.0)], 1)
        keys = torch.cat([self.quantile_keys[unique], _pick(ex["key"], matrix, float("inf"))], 1)
        order, bins, rank = _bin_order(values, keys, top, s.quantile_bins)
        chosen_sorted = (rank < s.per_quantile) & (bins < s.quantile_bins)
        chosen = torch.zeros_like(chosen_sorted).scatter_(1, order, chosen_sorted)
        self._replace("quantile", unique, chosen, matrix, ex, batch)

    def _replace(
        self,
        prefix: str,
        unique: Tensor,
        chosen: Tensor,
        matrix: Tensor,
        ex: dict[str, Tensor],
        batch: _Batch,
    ) -> None:
        """Keep the chosen pool entries of ``prefix``'s slots; write only what changed.

        ``chosen[i]`` marks, for latent ``unique[i]``, the held slots that stay (first
        columns) and the new examples ``matrix[i, j]`` that enter (the rest). A new
        example takes a slot whose example left; slots left over are emptied. Held
        examples never move, so the cost follows the examples that enter, not the slots
        (the order is restored once, by :meth:`ordered`).
        """
        values, source = getattr(self, f"{prefix}_values"), getattr(self, f"{prefix}_source")
        tokens = getattr(self, f"{prefix}_tokens")
        acts = getattr(self, f"{prefix}_activations")
        held = values.shape[1]
        leaving = ~chosen[:, :held]
        entering = chosen[:, held:]
        # The r-th entering example of a row takes the r-th freed slot of that row.
        freed = torch.sort(leaving.logical_not().to(torch.uint8), dim=1, stable=True).indices
        rank = entering.cumsum(1) - 1
        r, c = entering.nonzero(as_tuple=True)
        slot, latent, picked = freed[r, rank[r, c]], unique[r], matrix[r, c]
        # Freed slots nobody takes are emptied (quantile bins can shrink when the max grows).
        spare = leaving & (leaving.cumsum(1) > entering.sum(1, keepdim=True))
        sr, sc = spare.nonzero(as_tuple=True)
        empty = unique[sr]
        values[empty, sc], source[empty, sc], tokens[empty, sc], acts[empty, sc] = 0.0, -1, -1, 0
        if prefix == "quantile":
            self.quantile_keys[empty, sc] = float("inf")
            self.quantile_keys[latent, slot] = ex["key"][picked]
        win_tokens, win_acts = batch.windows(ex["position"][picked], ex["latent"][picked])
        tokens[latent, slot], acts[latent, slot] = win_tokens, win_acts
        values[latent, slot], source[latent, slot] = ex["value"][picked], ex["source"][picked]

    # ------------------------------------------------------------------ results
    def ordered(self, prefix: str) -> dict[str, Tensor]:
        """``prefix``'s examples in the store's order (new tensors; the state is unchanged).

        Top examples: largest value first, the earlier token on ties. Quantile examples:
        slot ``b * S + r`` holds the ``r``-th example (by key) of bin ``b`` of the latent's
        final maximum; empty slots hold padding.
        """
        values, source = getattr(self, f"{prefix}_values"), getattr(self, f"{prefix}_source")
        if prefix == "top":
            order = _by_value_then_source(values, source.masked_fill(source < 0, 1 << 62))
            empty = None
        else:
            s = self.settings
            q, per = s.quantile_bins, s.per_quantile
            top = self.act_max[:, None]
            pool_order, bins, rank = _bin_order(values, self.quantile_keys, top, q)
            chosen = (rank < per) & (bins < q)
            order = torch.zeros_like(pool_order)
            row, col = chosen.nonzero(as_tuple=True)
            order[row, bins[row, col] * per + rank[row, col]] = pool_order[row, col]
            empty = torch.ones_like(chosen)
            empty[row, bins[row, col] * per + rank[row, col]] = False
        out = {
            "values": values.gather(1, order),
            "source": source.gather(1, order),
            "tokens": _gather_rows(getattr(self, f"{prefix}_tokens"), order),
            "activations": _gather_rows(getattr(self, f"{prefix}_activations"), order),
        }
        if empty is not None:
            out["values"][empty], out["source"][empty] = 0.0, -1
            out["tokens"][empty], out["activations"][empty] = -1, 0
        return out


def _gather_rows(windows: Tensor, order: Tensor) -> Tensor:
    """``windows[f, order[f, j], :]`` for every latent ``f`` and slot ``j``."""
    return windows.gather(1, order[..., None].expand(-1, -1, windows.shape[2]))


def _by_value_then_source(values: Tensor, source: Tensor) -> Tensor:
    """Per row, column order by value (largest first), then source (earliest first)."""
    order = torch.argsort(source, dim=1, stable=True)
    return order.gather(1, torch.argsort(-values.gather(1, order), dim=1, stable=True))


def _bin_order(values: Tensor, keys: Tensor, top: Tensor, q: int) -> tuple[Tensor, Tensor, Tensor]:
    """Entries sorted by (activation-quantile bin, key), with their bins and ranks in bin.

    Bin ``b`` of ``q`` holds values in ``(b/q, (b+1)/q]`` of ``top``; entries with an
    infinite key (empty slots, padding) get bin ``q`` and sort last.

    Returns:
        ``(order, sorted_bins, rank)``, each ``[rows, columns]``.
    """
    bins = (values / top * q).ceil().long().sub(1).clamp(0, q - 1)
    bins = bins.masked_fill(keys.isinf(), q)
    order = torch.argsort(bins.double() * 2 + keys, dim=1, stable=True)
    sorted_bins = bins.gather(1, order)
    position = torch.arange(order.shape[1]).expand_as(order)
    first = torch.ones_like(sorted_bins, dtype=torch.bool)
    first[:, 1:] = sorted_bins[:, 1:] != sorted_bins[:, :-1]
    start = torch.where(first, position, torch.zeros_like(position)).cummax(1).values
    return order, sorted_bins, position - start


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
