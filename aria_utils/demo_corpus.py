"""The built-in prompt corpus: a few thousand prompts from templates, with uneven category sizes.

Real prompt corpora are skewed: a few topics dominate and some are rare. This corpus mimics that on
purpose (animals are about a quarter of it, musical instruments about 1.5 %), so that allocation
strategies have something to disagree about.

    python -m aria_utils.demo_corpus --output_dir demo-data   # writes demo-data/prompts.csv
"""

import csv
import itertools
import os
import random

from aria_utils.cli import argument_parser, run_cli

STYLES = [
    "a photo of", "a watercolor painting of", "a pencil sketch of", "a 3d render of",
    "an oil painting of", "a close-up photo of", "a cartoon drawing of", "a vintage postcard of",
]
# Only this share of prompts gets a style prefix: shared style words would otherwise dominate the
# sentence embeddings, and regions would group prompts by style instead of by content.
STYLED_FRACTION = 0.3

# category -> (subjects, details, settings, target number of prompts)
CATEGORIES = {
    "animals": (
        ["a cat", "a dog", "a horse", "a red fox", "an owl", "a rabbit", "a tiger", "an elephant",
         "a penguin", "a parrot", "a giraffe", "a sea turtle", "a wolf", "a hedgehog", "a koala"],
        ["", "sleeping", "running", "eating", "looking at the camera", "with its young"],
        ["in a meadow", "on a snowy hill", "in the rain", "at sunset", "in a forest", "on a beach",
         "in a field of flowers", "next to a river", "in tall grass", "under a tree"],
        780,
    ),
    "food": (
        ["a bowl of ramen", "a slice of pizza", "a stack of pancakes", "a cup of coffee", "a burger",
         "a chocolate cake", "a plate of sushi", "a bowl of fruit", "a croissant", "a taco",
         "a glass of orange juice", "a loaf of bread"],
        ["", "freshly made", "half eaten", "with steam rising", "served with a side dish"],
        ["on a wooden table", "in a busy cafe", "on a white plate", "at a picnic", "in a kitchen",
         "under warm light", "on a marble counter", "at a street market"],
        560,
    ),
    "vehicles": (
        ["a red sports car", "a vintage bicycle", "a steam locomotive", "a sailboat", "a motorcycle",
         "a city bus", "a hot air balloon", "a fire truck", "a small airplane", "a yellow taxi"],
        ["", "parked", "moving fast", "covered in dust", "brand new"],
        ["on a mountain road", "in a busy street", "at a harbor", "in the desert", "at night",
         "in a parking lot", "near a bridge", "in heavy fog"],
        450,
    ),
    "landscapes": (
        ["a mountain lake", "a desert canyon", "a waterfall", "a volcano", "a rolling green valley",
         "a frozen tundra", "a tropical island", "a pine forest", "a lavender field"],
        ["", "with mist", "with dramatic clouds", "with a rainbow", "seen from far away"],
        ["at dawn", "under a starry sky", "in autumn", "after a storm", "in winter", "at midday",
         "in spring", "seen from above"],
        400,
    ),
    "architecture": (
        ["a gothic cathedral", "a glass skyscraper", "a wooden cabin", "a lighthouse", "a japanese temple",
         "a stone bridge", "a windmill", "a medieval castle", "a modern library"],
        ["", "in ruins", "lit by lanterns", "covered in ivy", "under construction"],
        ["in the city", "on a cliff", "by the sea", "in the snow", "at dusk", "surrounded by trees"],
        300,
    ),
    "people": (
        ["an old fisherman", "a young dancer", "a chef", "a street musician", "an astronaut",
         "a child reading a book", "a painter at work", "a marathon runner"],
        ["", "smiling", "deep in thought", "wearing a red coat", "laughing with friends"],
        ["in a studio", "in a park", "on a stage", "in the street", "at home", "in the rain"],
        250,
    ),
    "objects": (
        ["a teapot", "an antique clock", "a pair of sneakers", "a desk lamp", "a leather backpack",
         "a glass vase", "a typewriter", "a wooden chair"],
        ["", "covered in dust", "brand new", "slightly broken", "painted blue"],
        ["on a shelf", "on a table", "in a shop window", "on the floor", "in soft light"],
        200,
    ),
    # The rare category: about 1.5 % of the corpus.
    "musical_instruments": (
        ["a violin", "a grand piano", "an acoustic guitar", "a saxophone", "a drum kit"],
        ["", "being played", "polished and shining", "with sheet music"],
        ["on a stage", "in a music shop", "in a living room"],
        45,
    ),
}


def _join(*parts):
    return " ".join(part for part in parts if part)


def build_demo_corpus(seed=0):
    """Return [(prompt, category), ...], deterministic for a seed, no duplicate prompts."""
    rng = random.Random(seed)
    rows = []
    for category, (subjects, details, settings, target) in CATEGORIES.items():
        plain = [_join(*parts) for parts in itertools.product(subjects, details, settings)]
        num_styled = round(STYLED_FRACTION * target)
        if target - num_styled > len(plain):
            raise ValueError(f"Category {category!r} has only {len(plain)} plain prompts, wants {target - num_styled}")
        chosen = rng.sample(plain, target - num_styled)
        styled = rng.sample([_join(style, prompt) for style in STYLES for prompt in plain], num_styled)
        rows.extend((prompt, category) for prompt in chosen + styled)
    rng.shuffle(rows)
    return rows


def write_demo_corpus(output_dir, seed=0):
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "prompts.csv")
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "category"])
        writer.writerows(build_demo_corpus(seed))
    return path


def parse_args(argv=None):
    parser = argument_parser("Write the built-in demo prompt corpus (prompts.csv).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    path = write_demo_corpus(args.output_dir, seed=args.seed)
    print(f"Demo corpus written to {path}")


if __name__ == "__main__":
    run_cli(main)
