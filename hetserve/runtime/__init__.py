"""Layer 4: what runs on the devices. KV descriptors and conversion, the worker side of KV transfer, the
transports it uses and the typed messages every socket carries (see ``docs/structure.md``)."""
