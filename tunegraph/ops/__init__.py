"""The work, with no Dagster import: data, base models, training, merging, evaluation, stages."""
