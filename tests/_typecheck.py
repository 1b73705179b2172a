"""The runtime type checker the jaxtyping import hook applies to alignax under pytest.

beartype with the PEP 484 numeric tower, so an ``int`` is accepted where ``float`` is annotated, as
every static type checker accepts it.
"""

from beartype import BeartypeConf, beartype

typechecker = beartype(conf=BeartypeConf(is_pep484_tower=True))
