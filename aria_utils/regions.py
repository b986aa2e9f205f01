"""Build the region index of a prompt corpus ahead of training (the index itself: aria_utils/method/region_index.py).

    python -m aria_utils.regions --prompt_file prompts.csv --num_regions 16 --output_dir regions

Pass the folder to training as --region_cache_dir.
"""

import logging

from aria_utils.cli import UserInputError, argument_parser, run_cli
from aria_utils.method.region_index import (DEFAULT_EMBEDDING_MODEL, build_or_load_region_index, format_region_table,
                                            teacher_embedding_model, teacher_embedding_pooling)


def parse_args(argv=None):
    parser = argument_parser("Build the region index of a prompt corpus ahead of training.")
    parser.add_argument("--prompt_file", required=True)
    parser.add_argument("--prompt_column", default="prompt")
    parser.add_argument("--num_regions", type=int, required=True)
    parser.add_argument("--output_dir", required=True, help="The cache folder (pass it as --region_cache_dir).")
    parser.add_argument("--region_embedding_model", default=DEFAULT_EMBEDDING_MODEL,
                        help="Sentence-transformer hub id or folder, or `teacher` / `teacher:mean` (with --teacher).")
    parser.add_argument("--teacher", default=None,
                        help="For --region_embedding_model teacher: the teacher pipeline (folder or hub id) whose text "
                             "encoder embeds the prompts; pass the same one to training.")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag in ("num_regions", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    return args


def main(argv=None):
    from aria_utils.data.prompts import load_prompt_corpus
    from aria_utils.quiet import silence_known_harmless_messages

    silence_known_harmless_messages()
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus = load_prompt_corpus(prompt_file=args.prompt_file, prompt_column=args.prompt_column)
    print(corpus.summary())
    embedding_model = args.region_embedding_model
    if teacher_embedding_pooling(embedding_model) is not None:
        if args.teacher is None:
            raise UserInputError(f"--region_embedding_model {embedding_model} needs --teacher (the pipeline whose text "
                                 "encoder embeds the prompts).")
        embedding_model = teacher_embedding_model(embedding_model, args.teacher, args.output_dir)
    index = build_or_load_region_index(corpus.prompts, args.output_dir, embedding_model,
                                       args.num_regions, args.seed, args.batch_size)
    print(format_region_table(index))


if __name__ == "__main__":
    run_cli(main)
