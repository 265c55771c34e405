"""How many of the sample corpus's facts a checkpoint knows: for each country of its fixed world
(data/sample_corpus.py) and each relation, whether the true value is the likeliest of all the
world's values after the corpus's own sentence ("The capital of X is", "The official language of X
is", "X uses the", "X is a country in"). The finetune demo (`orchestrator demo --finetune`) can
only answer what this finds: it teaches the answer format, the facts come from pretraining.

    .venv/bin/python benchmarks/fact_recall.py runs/demo [runs/demo-redllm ...]

Scoring: sum of log p(" " + value | sentence) over the value's tokens, tokenised as the in-loop
multiple-choice tasks tokenise a (context, choice) pair. A decoder reads [BOS] + sentence. An
encoder-decoder is scored in two layouts: `encoder` (the sentence but its last token encoded, as
the finetuning and `orchestrator evaluate` put a question: `continuation_logprobs`) and `decoder`
(an unrelated sentence encoded, the fact's sentence and value decoded: the decoder's own recall).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.sample_corpus import sample_world  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402
from orchestrator.tools.evaluate import continuation_logprobs  # noqa: E402
from orchestrator.tools.hf import load_model  # noqa: E402
from orchestrator.training.downstream import encode_pair  # noqa: E402

SENTENCES = {
    "capital": "The capital of {c} is",
    "language": "The official language of {c} is",
    "currency": "{c} uses the",
    "continent": "{c} is a country in",
}
PREFIX = "The weather was mild that year, and the harvest was good across the region."


@torch.no_grad()
def decoder_logprob(model, prefix: list[int], context: list[int], value: list[int]) -> float:
    """An encoder-decoder's log p(value | context) with `prefix` encoded and context + value
    decoded (positions continuing after the prefix's)."""
    ids = prefix + context + value
    logits = model(torch.tensor([ids[:-1]]), encoder_len=len(prefix))[0]  # (decoder, V)
    logp = torch.log_softmax(logits.float(), dim=-1)[-len(value) :]
    return float(logp.gather(1, torch.tensor(value)[:, None]).sum())


def recall(checkpoint: str, tokenizer: str | None = None, seed: int = 0) -> dict:
    model, cfg = load_model(checkpoint)
    model.eval()
    tok = Tokenizer(tokenizer or cfg.data.tokenizer)
    world = sample_world(seed)
    layouts = ["encoder", "decoder"] if cfg.model.arch == "encoder_decoder" else ["decoder"]
    prefix = tok.encode(PREFIX, bos=True)
    out: dict = {"checkpoint": checkpoint, "arch": cfg.model.arch}
    for layout in layouts:
        rows = {}
        for relation, sentence in SENTENCES.items():
            values = sorted({str(getattr(c, relation)) for c in world})
            hits = 0
            for country in world:
                scores = []
                for value in values:
                    ctx, cont = encode_pair(tok, sentence.format(c=country.name), " " + value)
                    if cfg.model.arch == "encoder_decoder" and layout == "decoder":
                        scores.append(decoder_logprob(model, prefix, ctx[1:], cont))
                    else:
                        scores.append(float(continuation_logprobs(model, ctx, cont)[0].sum()))
                best = max(range(len(values)), key=scores.__getitem__)
                hits += values[best] == str(getattr(country, relation))
            rows[relation] = {"known": hits, "countries": len(world), "values": len(values)}
        out[layout] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoints or run dirs (their latest)")
    p.add_argument("--tokenizer", default=None, help="default: the run's data.tokenizer")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    results = [recall(c, args.tokenizer) for c in args.checkpoints]
    for r in results:
        for layout in ("decoder", "encoder"):
            if layout in r:
                cells = ", ".join(
                    f"{k} {v['known']}/{v['countries']} (of {v['values']})"
                    for k, v in r[layout].items()
                )
                print(f"{r['checkpoint']} [{r['arch']}, subject in the {layout}]: {cells}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
