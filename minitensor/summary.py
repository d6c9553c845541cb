"""``Model.summary``'s table, laid out as Keras lays it out: layer (type), output shape, parameter
count and the layers it reads, one row per layer in call order."""
from __future__ import annotations


def summary_text(model, line_length=104):
    """The table of ``model`` as one string."""
    columns = (40, 22, 12)
    rule = "_" * line_length

    def row(name, shape, params, connected):
        return f"{name:<{columns[0]}}{shape:<{columns[1]}}{params:<{columns[2]}}{connected}"

    lines = [f'Model: "{model.name}"', rule, row("Layer (type)", "Output Shape", "Param #", "Connected to"),
             "=" * line_length]
    for i, node in enumerate(model.nodes):
        shape = "(None, " + ", ".join(map(str, node.output.shape)) + ")"
        connected = ", ".join(t.producer.name for t in node.inputs) or "-"
        label = f"{node.layer.name} ({type(node.layer).__name__})"
        lines.append(row(label, shape, f"{node.layer.count_params():,}", connected))
        lines.append(rule if i == len(model.nodes) - 1 else "")
    total = model.count_params()
    lines += [f"Total params: {total:,}", f"Trainable params: {total:,}", "Non-trainable params: 0", rule]
    return "\n".join(lines)
