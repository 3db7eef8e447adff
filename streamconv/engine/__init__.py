"""Stage 5 of the flow: plan the whole job from headers, then stream it within a memory budget.

``plan`` chains the stages below it (index -> model -> Megatron layout ->
format files) and sizes the stream's blocks with ``memory``; ``stream`` moves
source row blocks into the format's file writers; ``describe`` prints a plan.
"""
