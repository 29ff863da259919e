"""The contract layer: records, base classes, hook specifications and layout rules.

Everything a plugin and the pipeline agree on lives here, and nothing here imports the pipeline.
Plugin authors use the re-exports in :mod:`loaderkit.plugin`.
"""
