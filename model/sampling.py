"""Drawing codes from logits with per-row temperature, top-k and top-p, vectorized over a batch.

The filters are the reference's: top-k keeps logits >= the k-th largest and then ignores top-p;
otherwise top-p < 1 keeps the smallest set of most likely codes whose probability reaches top_p.
The draw itself is an inverse-CDF lookup of a uniform number the caller supplies, so that each
series can bring its own seeded stream and get the same draws alone or inside any batch.
"""

import torch


def draw(logits, temperature, top_k, top_p, uniform, largest_top_k: int = 0):
    """logits [R, V] float32; temperature, top_p [R] float; top_k [R] long; uniform [R] in [0, 1) -> ids [R].

    largest_top_k > 0 says that every row has 0 < top_k <= largest_top_k (the caller knows it without reading
    the tensor): then only the largest_top_k most likely codes can be kept, and `torch.topk` replaces the full
    sort. Both orders are descending, so the draw is the same; a tie at a row's k-th logit that reaches past
    largest_top_k codes is the one case where the sort would keep more codes.
    """
    vocab = logits.shape[-1]
    scaled = logits / temperature[:, None]
    if largest_top_k:
        ordered, order = torch.topk(scaled, min(largest_top_k, vocab), dim=-1)  # [R, K], descending
    else:
        ordered, order = torch.sort(scaled, dim=-1, descending=True)  # [R, V]

    kth = ordered.gather(1, (top_k.clamp(1, ordered.shape[-1]) - 1)[:, None])
    keep_top_k = ordered >= kth
    if largest_top_k:
        keep = keep_top_k
    else:
        cumulative = ordered.softmax(-1).cumsum(-1)
        beyond = cumulative > top_p[:, None]
        # keep the code that crosses top_p too: shift the removal mask one place right
        keep_top_p = ~torch.cat([torch.zeros_like(beyond[:, :1]), beyond[:, :-1]], dim=1)
        keep = torch.where(
            (top_k > 0)[:, None], keep_top_k, torch.where((top_p < 1)[:, None], keep_top_p, torch.ones_like(beyond))
        )
    cdf = ordered.masked_fill(~keep, float("-inf")).softmax(-1).cumsum(-1)
    pick = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).clamp_(max=ordered.shape[-1] - 1)
    return order.gather(1, pick)[:, 0]
