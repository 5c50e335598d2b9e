"""Built-in benchmarks, one module each, registered with ``@register_benchmark`` (installed as
``clbench.benchmarks``)."""
