"""ilm_jax.data: real and synthetic recommendation data under the OpenP5 protocol.

`load_dataset(config.data)` returns a processing.ProcessedDataset (cached on
disk); `pipeline` turns it into every phase's examples, grain training
iterators and padded eval batches;
`python -m ilm_jax.data.prepare` builds one from the command line.
"""

from ilm_jax.data import sources

load_dataset = sources.load_dataset
DATASETS = sources.DATASETS
