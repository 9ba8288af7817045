"""The lifecycle stages, side by side: prepare, pretrain, finetune, evaluate, compress, registry (register,
promote), serve, annotate. A stage depends on the layers below it (services, components, tasks, models,
data, core, artifacts) and never on another stage; the flows and the CLI compose them."""
