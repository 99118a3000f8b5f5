"""What a launch is made of and checked against: the domain spec and its XML, the canonical configuration, firmware and image inspection, reference values, the launch manifest, the start gate."""
