include $(sort $(wildcard $(BR2_EXTERNAL_FL_EDGE_PATH)/package/*/*.mk))
