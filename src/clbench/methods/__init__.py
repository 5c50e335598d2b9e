"""Built-in continual-learning methods, one module each, registered with ``@register_method`` (installed as
``clbench.methods``). Modules whose name starts with ``_`` hold shared pieces and register nothing."""
