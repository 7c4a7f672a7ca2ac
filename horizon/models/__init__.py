from horizon.models.decoder import PRESETS, Decoder, DecoderConfig, decoder_config
from horizon.models.units import Units, UnitKind, UnitSpec, find_units

__all__ = ["Decoder", "DecoderConfig", "PRESETS", "decoder_config", "Units", "UnitKind", "UnitSpec", "find_units"]
