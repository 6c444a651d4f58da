"""The bundle format: what ``vla-edge export`` writes and the runtime reads, in one home both reach.

* :mod:`.spec`: the token formulas, image layout and policy constants of the contract (``TokenSpec``,
  ``ImageLayout``, ``PolicySpec``, the Piper joint limits in rad and m);
* :mod:`.prompt`: the prompt template and the tokenizer's text encoder;
* :mod:`.manifest`: ``manifest.json``'s schema, :class:`~.manifest.Bundle` (load and verify a bundle
  directory) and writing a manifest.

Usage::

    from vla_edge.edge.bundle.manifest import Bundle
    bundle = Bundle.load("reach-int8/")      # checks the schema and every file's sha256
"""
