"""DARecbase: DARec whose lower layers read each item's text causally instead of both ways, and no CF injection
(the paper's base variant; settings in properties/model/DARecbase.yaml)."""

from recbole_darec.model.darec import DARec


class DARecbase(DARec):
    pass
