"""The loading pipeline, one module per stage (see ``docs/pipeline.md``):

discover -> inspect -> build -> negotiate -> place -> stream -> bind -> verify, and convert.
"""
