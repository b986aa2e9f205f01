import json
import logging
import os

import numpy as np
import pytest

from aria_utils.fixtures.demo_corpus import build_demo_corpus
from aria_utils.method.region_index import (
    RegionIndexError,
    build_or_load_region_index,
    load_region_index,
)
from aria_utils.regions import main as regions_cli

PROMPTS = [prompt for prompt, _ in build_demo_corpus(seed=0)][:400]


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("regions"))
    index = build_or_load_region_index(PROMPTS, cache, num_regions=6, seed=0)
    return cache, index


def test_index_contents(built_cache):
    cache, index = built_cache
    assert index.num_regions == 6 and index.labels.shape == (400,)
    assert index.sizes.sum() == 400 and (index.sizes > 0).all()
    assert all(1 <= len(r) <= 5 for r in index.representatives)
    # Representatives belong to their region.
    lookup = {p: i for i, p in enumerate(PROMPTS)}
    for region, representatives in enumerate(index.representatives):
        assert all(index.labels[lookup[p]] == region for p in representatives)
    metadata = json.load(open(os.path.join(cache, "regions.json")))
    assert [r["size"] for r in metadata["regions"]] == index.sizes.tolist()


def test_semantic_clusters_follow_categories(built_cache):
    _, index = built_cache
    categories = [category for _, category in build_demo_corpus(seed=0)][:400]
    # Each region should be dominated by one category (the corpus is built from category templates).
    purities = []
    for region in range(index.num_regions):
        members = [categories[i] for i in np.flatnonzero(index.labels == region)]
        purities.append(max(members.count(c) for c in set(members)) / len(members))
    assert np.mean(purities) > 0.6


def test_nearest_centroid_assignment_of_corpus_prompts_agrees_with_labels(built_cache):
    _, index = built_cache
    assigned = index.assign_prompts(PROMPTS[:50])  # embedded again, not looked up
    assert (assigned == index.labels[:50]).mean() > 0.95
    assert (index.assign_prompts(PROMPTS[:50], corpus_prompts=PROMPTS) == index.labels[:50]).all()


def test_cache_reused_and_never_rebuilt_in_place(built_cache, caplog, monkeypatch):
    """A shared cache keeps its index; another K or corpus gets a subfolder of its own, reused next time."""
    cache, index = built_cache
    caplog.set_level(logging.INFO, logger="aria_utils.method.region_index")
    again = build_or_load_region_index(PROMPTS, cache, num_regions=6, seed=0)
    assert "reusing the cache" in caplog.text
    assert np.array_equal(again.labels, index.labels)
    caplog.clear()
    # Another K of the same corpus and model clusters the embeddings already there instead of embedding again.
    from aria_utils.method import region_index

    embedded, embed = [], region_index.embed_prompts
    with monkeypatch.context() as patched:  # the regions' candidate words are embedded, no prompt is
        patched.setattr(region_index, "embed_prompts",
                        lambda texts, *args, **kwargs: embedded.extend(texts) or embed(texts, *args, **kwargs))
        five = build_or_load_region_index(PROMPTS, cache, num_regions=5, seed=0)
    assert embedded and not set(embedded) & set(PROMPTS)
    assert "K (--num_regions)" in caplog.text and "index-k5-" in caplog.text
    assert f"from the embeddings in {cache}" in caplog.text
    assert five.num_regions == 5 and load_region_index(cache).num_regions == 6  # the shared one is untouched
    assert np.array_equal(load_region_index(cache).labels, index.labels)
    caplog.clear()
    build_or_load_region_index(PROMPTS, cache, num_regions=5, seed=0)
    assert "reusing the cache" in caplog.text and "index-k5-" in caplog.text
    caplog.clear()
    build_or_load_region_index(PROMPTS[:-1], cache, num_regions=5, seed=0)
    assert "corpus content" in caplog.text and "from the embeddings in" not in caplog.text


def test_bad_region_input():
    with pytest.raises(RegionIndexError, match="--num_regions 10 exceeds the 3 distinct prompts"):
        build_or_load_region_index(["a", "b", "c"], "/tmp/unused-cache", num_regions=10)
    with pytest.raises(RegionIndexError, match="--region_embedding_model"):
        build_or_load_region_index(PROMPTS, "/tmp/unused-cache", model_name="./no/such/model", num_regions=2)


def test_cli_prints_table(tmp_path, capsys):
    corpus = tmp_path / "p.txt"
    corpus.write_text("\n".join(PROMPTS[:60] + ["", PROMPTS[0]]))
    regions_cli(["--prompt_file", str(corpus), "--num_regions", "3", "--output_dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert "60 distinct prompts" in out and "1 empty and 1 duplicate" in out
    assert out.count("\n") >= 5 and "representative prompts" in out
    with pytest.raises(SystemExit):
        regions_cli(["--prompt_file", str(corpus), "--num_regions", "0", "--output_dir", str(tmp_path / "r")])
    assert "--num_regions must be at least 1" in capsys.readouterr().err


def test_regions_are_named_by_their_most_distinctive_words(assets, tmp_path):
    """On the demo corpus, the region holding most of the rare musical-instrument prompts is named by an
    instrument; the names reach regions.json, aria_regions.json's source (`describe`) and the heat map."""
    from aria_utils.data.prompts import load_prompt_corpus
    from aria_utils.fixtures.demo_corpus import CATEGORIES
    from aria_utils.plots import region_heatmap
    from conftest import shared_region_index

    corpus = load_prompt_corpus(prompt_file=assets["prompts"], category_column="category")
    folder = shared_region_index(assets, list(corpus.prompts), 32)
    index = load_region_index(folder)  # the names come back from the cache, not only from the build
    categories = np.asarray(corpus.categories)
    holding = np.bincount(index.labels[categories == "musical_instruments"], minlength=32).argmax()
    instrument_words = {word for subject in CATEGORIES["musical_instruments"][0] for word in subject.split()[1:]}
    assert set(index.keywords[holding]) & instrument_words, index.keywords[holding]
    assert all(1 <= len(words) <= 3 for words in index.keywords)
    assert index.describe()[holding]["label"] == f"{holding}: " + ", ".join(index.keywords[holding])
    history = [(step, np.random.default_rng(step).random(32), np.full(32, 1 / 32)) for step in range(0, 50, 10)]
    image = region_heatmap(history, str(tmp_path / "heatmap.png"),
                           region_names=[index.label(k) for k in range(32)])
    # At 100 dpi every one of the 32 rows gets at least 20 pixels: room for its 8-point name.
    assert image.shape[0] >= 32 * 20 and (tmp_path / "heatmap.png").is_file()


def test_regions_in_the_teacher_text_encoder_space(assets, tmp_path):
    """--region_embedding_model teacher: the training run embeds its corpus with the teacher's own text encoder
    (CLIP's pooled state), records it in the region cache and report; teacher:mean averages the tokens."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from aria_utils.method.region_index import RegionIndexError, embed_prompts, teacher_embedding_model
    from conftest import run, training_command

    cache, output = tmp_path / "cache", tmp_path / "run"
    run(training_command(assets, output, "--region_embedding_model", "teacher", "--num_regions", "3",
                         "--region_cache_dir", str(cache), sampling="aria", steps=2))
    identity = f"teacher text_encoder of {os.path.abspath(assets['teacher'])} (pooled)"
    [index_meta] = [json.load(open(path)) for path in cache.rglob("regions.json")]
    assert index_meta["fingerprint"]["embedding_model"] == identity
    assert json.load(open(output / "aria_regions.json"))["embedding_model"] == identity

    tokenizer = CLIPTokenizer.from_pretrained(assets["teacher"], subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(assets["teacher"], subfolder="text_encoder")
    prompts = ["a violin on a stage", "an oil painting of a harbour"]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        output_states = encoder(**tokens)
    mask = tokens.attention_mask.unsqueeze(-1).float()
    expected = {"pooled": output_states.pooler_output,
                "mean": (output_states.last_hidden_state * mask).sum(1) / mask.sum(1)}
    for pooling, vectors in expected.items():
        folder = teacher_embedding_model(f"teacher:{pooling}", assets["teacher"], str(cache))
        vectors = torch.nn.functional.normalize(vectors, dim=-1).numpy()
        assert np.allclose(embed_prompts(prompts, folder, show_progress=False), vectors, atol=1e-5)
    with pytest.raises(RegionIndexError, match="teacher:pooled or teacher:mean"):
        teacher_embedding_model("teacher:max", assets["teacher"], str(cache))
