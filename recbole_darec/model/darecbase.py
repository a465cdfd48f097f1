"""DARecbase: DARec with a plain causal mask and no CF injection (settings in properties/model/DARecbase.yaml)."""

from recbole_darec.model.darec import DARec


class DARecbase(DARec):
    pass
