"""TaskFlow decorators: ``@task.openai_batch``."""
