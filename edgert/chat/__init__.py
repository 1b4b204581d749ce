"""Chat semantics beyond plain text: Gemma 4 tool calls and thinking.

Pure Python, no inference library: what the model's output means (:mod:`.gemma4_output`),
which calls it may make (:mod:`.tool_grammar`), and the events both transports translate
(:mod:`.events`). The serving path wires them to the engine; the transports to their wire formats.
"""
