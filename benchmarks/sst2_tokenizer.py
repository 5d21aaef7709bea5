"""A WordPiece tokenizer trained on SST-2's training sentences, and a BERT config beside it:
a model folder that `init: random` sweeps build from, with nothing from the Hugging Face hub
(the GPU machine cannot reach it).

    python benchmarks/sst2_tokenizer.py GLUE_DIR OUT_DIR [--hidden 768] [--layers 12]

The sweep files then set `teacher.model` and `student.model` to OUT_DIR and choose the depth
with `config: {num_hidden_layers: N}`.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from tokenizers import BertWordPieceTokenizer
from tokenizers.processors import BertProcessing
from transformers import BertConfig, PreTrainedTokenizerFast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("glue_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    args = ap.parse_args()
    with open(args.glue_dir / "SST-2" / "train.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator((r["sentence"] for r in rows), vocab_size=args.vocab,
                            min_frequency=2,
                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok._tokenizer.post_processor = BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    args.out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(args.out)
    BertConfig(vocab_size=len(fast), hidden_size=args.hidden, num_hidden_layers=args.layers,
               num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
               max_position_embeddings=128).save_pretrained(args.out)
    if len(fast) <= 1000:
        raise SystemExit(f"tokenizer training failed: vocabulary of {len(fast)}")
    print(f"vocab {len(fast)} from {len(rows)} sentences; hidden {args.hidden}, "
          f"{args.layers} layers; {fast('a fine film')['input_ids']}")


if __name__ == "__main__":
    main()
