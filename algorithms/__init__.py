"""Pure tensor math: quantizer, RTN, GPTQ. No I/O, no Ray, no config files."""
