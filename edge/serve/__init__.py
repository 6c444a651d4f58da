"""The policy server (``vla-edge serve``): :mod:`.handler` runs one bundle's engine behind the wire format
(no Ray), :mod:`.app` puts replicas of it on Ray Serve. The robot-side runtime never imports this package:
its client is :mod:`vla_edge.edge.remote`.

Usage::

    vla-edge serve --bundle bundle/ --port 8000                   # a local Ray, one replica
    vla-edge run --robot sim --policy-server http://127.0.0.1:8000
"""
