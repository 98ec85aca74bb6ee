"""The layout object: validation, per-row key sets and the dense mask it builds."""

import pytest
import torch

from adclr.kernels import QUERY_KEY_RULES, AttentionLayout


def expected_keys(layout: AttentionLayout, row: int) -> set[int]:
    """The table of docs/token-layout.md, written out independently of the layout's own code."""
    R, P, L = layout.num_raw, layout.num_prefix, layout.length
    if layout.bidirectional or row < R:
        return set(range(L if layout.bidirectional else R))
    keys = set(range(0 if layout.query_keys.startswith("prefix") else P, R))
    if layout.query_keys.endswith("+self"):
        keys.add(row)
    return keys


LAYOUTS = [
    AttentionLayout(num_raw=R, num_query=Q, num_prefix=P, query_keys=rule, bidirectional=bidi)
    for rule in QUERY_KEY_RULES
    for R, Q, P in [(1, 0, 1), (1, 3, 0), (5, 3, 1), (9, 0, 0), (17, 10, 2), (4, 4, 4)]
    for bidi in (False, True)
    if not (rule == "raw" and P == R and Q > 0 and not bidi)
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_dense_mask_and_row_keys_match_the_spec(layout):
    mask = layout.dense_mask()
    assert mask.shape == (layout.length, layout.length) and mask.dtype == torch.bool
    for row in range(layout.length):
        keys = expected_keys(layout, row)
        assert set(torch.nonzero(mask[row]).flatten().tolist()) == keys
        start, end, has_self = layout.row_keys(row)
        assert set(range(start, end)) | ({row} if has_self else set()) == keys


def test_no_query_row_sees_another_query_token():
    layout = AttentionLayout(num_raw=7, num_query=5, query_keys="prefix+raw+self")
    block = layout.dense_mask()[7:, 7:]
    assert torch.equal(block, torch.eye(5, dtype=torch.bool))
    assert not layout.dense_mask()[:7, 7:].any()


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(num_raw=0), ValueError, "num_raw"),
        (dict(num_raw=-3), ValueError, "num_raw"),
        (dict(num_raw=5, num_query=-1), ValueError, "num_query"),
        (dict(num_raw=5, num_prefix=-1), ValueError, "num_prefix"),
        (dict(num_raw=5, num_prefix=6), ValueError, "num_prefix"),
        (dict(num_raw=5, query_keys="all"), ValueError, "prefix+raw"),
        (dict(num_raw=2.5), TypeError, "num_raw"),
        (dict(num_raw=True), TypeError, "num_raw"),
        (dict(num_raw=5, bidirectional="yes"), TypeError, "bidirectional"),
        (dict(num_raw=3, num_query=2, num_prefix=3, query_keys="raw"), ValueError, "no key"),
    ],
)
def test_bad_layouts_raise_naming_the_argument(kwargs, error, words):
    with pytest.raises(error, match=words.replace("+", r"\+")):
        AttentionLayout(**kwargs)


def test_raw_rule_with_no_patches_is_fine_without_queries_or_with_self():
    AttentionLayout(num_raw=3, num_query=0, num_prefix=3, query_keys="raw")
    AttentionLayout(num_raw=3, num_query=2, num_prefix=3, query_keys="raw+self")


def test_kernel_params():
    assert AttentionLayout(197, 10).kernel_params == (197, 0, False)
    assert AttentionLayout(197, 10, query_keys="raw+self").kernel_params == (197, 1, True)
    assert AttentionLayout(197, 10, bidirectional=True).kernel_params == (207, 0, False)
    assert AttentionLayout(197, 0, query_keys="raw").kernel_params == (197, 0, False)


def test_named_layouts():
    assert AttentionLayout.named("raw+self", 197, 10) == AttentionLayout(197, 10, 1, "raw+self")
    assert AttentionLayout.named("bidirectional", 50, 3, 0) == AttentionLayout(50, 3, 0, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional"):
        AttentionLayout.named("causal", 5, 1)
