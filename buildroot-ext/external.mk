include $(sort $(wildcard $(BR2_EXTERNAL_PARSEC_PATH)/package/*/*.mk))
