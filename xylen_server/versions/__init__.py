"""Model versions: which model serves, and changing it without dropping a request.

``history``  the one owner of the ``.versions`` layout: kept versions, the rollback rule,
             backup and restore archives
``swap``     promotion, rollback and reload through one hot swap (ModelManager)
``cli``      ``xylen-server model list|backup|restore|rollback|import``
``importer`` ``model import``: an outside booster checked, converted, verified and written
"""
