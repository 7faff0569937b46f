"""Template projects and a session with the device: what microTVM's project API did.

::

    artifact = tvm_tinytrain.build(train_mod, params, target="c", budget="256KB")
    project = micro.create_project(artifact, "qemu_cortex_m7", "qemu_proj", {"ram_kb": 320})
    project.build()
    project.flash()
    with project.session() as dev:
        loss = dev.train_step(x, y)   # dev.last_cost: instructions on QEMU, ns on the host
        logits = dev.predict(x)
        params = dev.params()

A template is a folder of ``microtvm_projects/`` (or any folder) with a
``template.json`` naming its tools, its options (with help and defaults), its boards and how to
build, flash and run the program (the format: :mod:`tvm_tinytrain.micro.project`).
``create_project`` copies it, the shared protocol code and the artifact (under ``model/``) into a
project folder that builds by itself; ``open_project(folder)`` reopens it with its template,
options and board.
The device speaks the framed byte protocol of ``microtvm_projects/common/tinytrain_protocol.h``.
"""

from ..errors import InputError
from .project import (
    PROJECT_MARKER,
    TEMPLATES,
    DeviceError,
    Project,
    TemplateInfo,
    TemplateOption,
    ToolMissingError,
    check_tools,
    create_project,
    is_project,
    list_templates,
    open_project,
    template_info,
    template_names,
)
from .session import PROTOCOL_VERSION, Session

__all__ = ["PROJECT_MARKER", "PROTOCOL_VERSION", "TEMPLATES", "DeviceError", "InputError", "Project",
           "Session", "TemplateInfo", "TemplateOption", "ToolMissingError", "check_tools", "create_project",
           "is_project", "list_templates", "open_project", "template_info", "template_names"]
