"""Compose a loss from a base loss and three regularizers; see where loss and gradient come from."""

import torch
import trio

import tinkex


def cross_entropy(data, logprobs):  # Tinker's weighted cross-entropy, per counted token
    w = [tinkex.loss_input(d, "weights", like=lp) for d, lp in zip(data, logprobs, strict=True)]
    return -sum((wi * lp).sum() for wi, lp in zip(w, logprobs, strict=True)) / sum(
        wi.sum() for wi in w
    ), {}


async def main():
    data = [
        tinkex.Datum(
            model_input=[72, 105, 33],
            loss_fn_inputs={"target_tokens": [105, 33, 10], "weights": [0, 1, 1]},
        )
    ]
    logprobs = [torch.tensor([-0.3, -1.2, -2.5])]  # target-token logprobs from your model
    out = await tinkex.compute_loss(
        data,
        logprobs,
        cross_entropy,
        track_grad_norms=True,
        regularizers=[
            tinkex.regularizer("entropy", weight=0.05, mode="maximize"),  # from tinkex-reg-entropy
            tinkex.regularizer("l2", weight=0.01, reduction="mean"),  # from tinkex-reg-norms
            tinkex.RegularizerSpec(
                fn=lambda d, lp: (torch.exp(lp[0]).mean(), {}), weight=0.1, name="mean_prob"
            ),
        ],
    )
    print(out.to_json(indent=2))


trio.run(main)
