"""The ADCLR token layout: the single definition of who attends to whom.

A sequence is ``[prefix (P), raw patches, query tokens (Q)]`` with ``R = P + patches`` raw tokens and
``L = R + Q`` in all (specified in docs/token-layout.md). Raw rows attend to keys ``[0, R)``; query rows attend to
``[0, R)`` or ``[P, R)``, optionally plus their own key (the diagonal); no query row sees another
query token. The reference, the SDPA fallback, the Triton kernel and the benchmarks all read the
structure from this object; ``dense_mask`` exists for tests and for peers that need a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..choices import QUERY_KEY_RULES

# The names benchmarks and tests give a layout: a query-key rule, or the bidirectional ablation.
LAYOUT_NAMES = (*QUERY_KEY_RULES, "bidirectional")


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


@dataclass(frozen=True)
class AttentionLayout:
    """Token layout of one ADCLR attention call.

    Args:
        num_raw: R, the prefix tokens plus the raw patch tokens (197 for a 224 px view at patch 16).
        num_query: Q, the query tokens appended after the raw ones (0 is plain self-attention).
        num_prefix: P, the CLS token (and register tokens, if any) at the start; ``P <= R``.
        query_keys: which keys a query row sees, one of ``QUERY_KEY_RULES``.
        bidirectional: every row sees all ``L`` keys (the paper's Fig. 2c ablation only).
    """

    num_raw: int
    num_query: int = 0
    num_prefix: int = 1
    query_keys: str = "prefix+raw"
    bidirectional: bool = False

    def __post_init__(self):
        _check_count("num_raw", self.num_raw, 1)
        _check_count("num_query", self.num_query, 0)
        _check_count("num_prefix", self.num_prefix, 0)
        if self.num_prefix > self.num_raw:
            raise ValueError(
                f"num_prefix must be <= num_raw (prefix tokens are counted in R), "
                f"got num_prefix={self.num_prefix}, num_raw={self.num_raw}"
            )
        if self.query_keys not in QUERY_KEY_RULES:
            raise ValueError(f"query_keys must be one of {QUERY_KEY_RULES}, got {self.query_keys!r}")
        if not isinstance(self.bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool, got {self.bidirectional!r}")
        if (
            not self.bidirectional
            and self.num_query > 0
            and self.query_key_start == self.num_raw
            and not self.query_self
        ):
            raise ValueError(
                f"query_keys={self.query_keys!r} with num_prefix == num_raw == {self.num_raw} leaves query "
                f"rows with no key; use one of {QUERY_KEY_RULES[0]!r}, {QUERY_KEY_RULES[2]!r}, "
                f"{QUERY_KEY_RULES[3]!r} or add raw tokens"
            )

    @classmethod
    def named(cls, name: str, num_raw: int, num_query: int = 0, num_prefix: int = 1) -> AttentionLayout:
        """The layout called ``name`` (one of ``LAYOUT_NAMES``): a query-key rule, or ``bidirectional``."""
        if name not in LAYOUT_NAMES:
            raise ValueError(f"name must be one of {LAYOUT_NAMES}, got {name!r}")
        if name == "bidirectional":
            return cls(num_raw, num_query, num_prefix, bidirectional=True)
        return cls(num_raw, num_query, num_prefix, name)

    @property
    def length(self) -> int:
        """L = R + Q, the sequence length the layout describes."""
        return self.num_raw + self.num_query

    @property
    def query_key_start(self) -> int:
        """First key of a query row: 0 when the prefix is visible, P otherwise."""
        return 0 if self.query_keys.startswith("prefix") else self.num_prefix

    @property
    def query_self(self) -> bool:
        """Whether a query row also sees its own key (the diagonal term)."""
        return self.query_keys.endswith("+self")

    @property
    def kernel_params(self) -> tuple[int, int, bool]:
        """``(shared_keys, query_key_start, query_self)`` as the kernels read them.

        Rows ``< shared_keys`` attend to keys ``[0, shared_keys)``; later rows attend to
        ``[query_key_start, shared_keys)`` plus their own key when ``query_self``. The bidirectional
        layout is the special case ``shared_keys = L`` (every row is a "raw" row).
        """
        if self.bidirectional or self.num_query == 0:
            return self.length, 0, False
        return self.num_raw, self.query_key_start, self.query_self

    def row_keys(self, row: int) -> tuple[int, int, bool]:
        """``(start, end, has_self)``: row ``row`` sees keys ``[start, end)`` and, if ``has_self``, key ``row``."""
        if not 0 <= row < self.length:
            raise ValueError(f"row must be in [0, {self.length}), got {row}")
        shared, q_start, q_self = self.kernel_params
        if row < shared:
            return 0, shared, False
        return q_start, shared, q_self

    def dense_mask(self, device=None) -> torch.Tensor:
        """Boolean ``[L, L]`` mask, True where row i may attend to key j (tests and mask-based peers)."""
        shared, q_start, q_self = self.kernel_params
        rows = torch.arange(self.length, device=device)[:, None]
        keys = torch.arange(self.length, device=device)[None, :]
        key_start = torch.where(rows < shared, 0, q_start)
        allowed = (keys >= key_start) & (keys < shared)
        if q_self:
            allowed |= (rows == keys) & (rows >= shared)
        return allowed
