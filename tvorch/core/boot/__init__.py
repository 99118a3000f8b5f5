"""Predicted boot measurements: the disk (GPT, FAT, PE), the UEFI variable store and Secure Boot, and the events OVMF, systemd-stub and SeaBIOS will measure."""
