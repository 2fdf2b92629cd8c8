"""Declared styles: one folder per style with its ``defs.yaml`` (a ``LoraTraining`` component).

The project's dg defs folder ([tool.dg.project] defs_module): ``dg scaffold defs
lora_pipeline.LoraTraining <style>`` writes ``<style>/defs.yaml`` here, ``dg check yaml``
validates them, and ``lora_pipeline.definitions`` loads them. No Python code lives here.
"""
