"""The offline tools: the planner and its measurements (``plan``), the quality harness (``eval``), students and
their training (``distill``) and the GGUF converter (``convert``). They run on ``runtime``; nothing here is
imported by an agent, and ``eval`` imports nothing from ``plan``.
"""
